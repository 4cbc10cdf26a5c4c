-- progress: ARGV = ns, ttl_ms, task_id, progress JSON. Stored beside an existing record, whose
-- header is marked ("<attempt>:<terminal>:1|") so later writes keep it.
local rk = ARGV[1] .. ':r:' .. ARGV[3]
local cur = redis.call('GETRANGE', rk, 0, 23)
if cur == '' then return 0 end
redis.call('SET', ARGV[1] .. ':p:' .. ARGV[3], ARGV[4], 'PX', ARGV[2])
redis.call('PEXPIRE', rk, ARGV[2])
local a = string.match(cur, '^(%d+):%d:%d|')
if a then redis.call('SETRANGE', rk, string.len(a) + 3, '1') end
return 1
