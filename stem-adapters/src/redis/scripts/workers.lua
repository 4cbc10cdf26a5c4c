-- workers: ARGV = ns. Drops expired heartbeats, returns the live ones (JSON).
local hk = ARGV[1] .. ':workers'
local zk = ARGV[1] .. ':workers:exp'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dead = redis.call('ZRANGEBYSCORE', zk, '-inf', now)
for s = 1, #dead, 1000 do
  redis.call('HDEL', hk, unpack(dead, s, math.min(s + 999, #dead)))
end
redis.call('ZREMRANGEBYSCORE', zk, '-inf', now)
local live = redis.call('ZRANGEBYSCORE', zk, '(' .. now, '+inf')
if #live == 0 then return {} end
return redis.call('HMGET', hk, unpack(live))
