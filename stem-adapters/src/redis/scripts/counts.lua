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
    local summary = redis.pcall('XPENDING', sk, G)
    if type(summary) == 'table' and not summary.err then
      local pel = tonumber(summary[1])
      if pel > 0 then
        local expired = expired_leases(sk, pel, false)
        leased = leased + pel - #expired
      end
    end
  end
end
local pending = total - leased
if pending < 0 then pending = 0 end
return {pending, redis.call('ZCARD', k_delayed(q)), leased, redis.call('ZCARD', k_dlqi(q))}
