-- heartbeat: ARGV = ns, worker_id, heartbeat JSON, ttl_ms.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', ARGV[1] .. ':workers', ARGV[2], ARGV[3])
redis.call('ZADD', ARGV[1] .. ':workers:exp', now + tonumber(ARGV[4]), ARGV[2])
return 1
