-- progress: ARGV = ns, ttl_ms, task_id, progress JSON, the task's `queued` slot hash ('' for
-- none). Stored beside an existing record, whose header is marked ("<attempt>:<terminal>:1|")
-- so later writes keep it; beside a `queued` record in its slot hash it is stored unmarked
-- (reads always look for it). Returns 0 for a task with no record at all.
local rk = ARGV[1] .. ':r:' .. ARGV[3]
local pk = ARGV[1] .. ':p:' .. ARGV[3]
local cur = redis.call('GETRANGE', rk, 0, 23)
if cur == '' then
  if ARGV[5] == '' or redis.call('HEXISTS', ARGV[5], ARGV[3]) == 0 then return 0 end
  redis.call('SET', pk, ARGV[4], 'PX', ARGV[2])
  return 1
end
redis.call('SET', pk, ARGV[4], 'PX', ARGV[2])
redis.call('PEXPIRE', rk, ARGV[2])
local a = string.match(cur, '^(%d+):%d:%d|')
if a then redis.call('SETRANGE', rk, string.len(a) + 3, '1') end
return 1
