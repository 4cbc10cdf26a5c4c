-- counts: ARGV = ns, queue. Returns {pending, delayed, in_flight, dead}.
-- in_flight = pending deliveries (PEL) whose lease has not run out; pending = stream entries
-- not under a live lease (never delivered, or leased but expired/released and waiting to be
-- redelivered).
local q = ARGV[2]
local total = 0
local leased = 0
for p = 0, 9 do
  local sk = k_stream(q, tostring(p))
  local len = redis.call('XLEN', sk)
  if len > 0 then
    total = total + len
    local expired, _, pel = expired_leases(sk, len, false)
    leased = leased + pel - #expired
  end
end
local pending = total - leased
if pending < 0 then pending = 0 end
return {pending, redis.call('ZCARD', k_delayed(q)), leased, redis.call('ZCARD', k_dlqi(q))}
