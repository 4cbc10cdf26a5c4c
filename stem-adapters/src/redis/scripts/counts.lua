-- counts: ARGV = ns, queue. Returns {pending, delayed, in_flight, dead}.
-- in_flight = live leases; pending = stream entries not under a live lease (never delivered,
-- or leased but expired/released and waiting to be redelivered).
local q = ARGV[2]
local now = now_ms()
local total = 0
for p = 0, 9 do
  total = total + redis.call('XLEN', k_stream(q, tostring(p)))
end
local live = redis.call('ZCOUNT', k_leases(q), '(' .. now, '+inf')
local pending = total - live
if pending < 0 then pending = 0 end
return {pending, redis.call('ZCARD', k_delayed(q)), live, redis.call('ZCARD', k_dlqi(q))}
