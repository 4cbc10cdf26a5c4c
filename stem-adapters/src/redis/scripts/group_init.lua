-- group_init: ARGV = ns, ttl_ms, group_id, total. Idempotent. Fields: see groups.rs.
local gk = ARGV[1] .. ':g:' .. ARGV[3]
if redis.call('EXISTS', gk) == 1 then return 0 end
redis.call('HSET', gk, 'total', ARGV[4], 'f', 0)
redis.call('PEXPIRE', gk, ARGV[2])
return 1
