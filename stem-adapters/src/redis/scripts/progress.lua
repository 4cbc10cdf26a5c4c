-- progress: ARGV = ns, ttl_ms, task_id, progress JSON. Stored next to an existing record.
local rk = ARGV[1] .. ':r:' .. ARGV[3]
if redis.call('EXISTS', rk) == 0 then return 0 end
redis.call('SET', ARGV[1] .. ':p:' .. ARGV[3], ARGV[4], 'PX', ARGV[2])
redis.call('PEXPIRE', rk, ARGV[2])
return 1
