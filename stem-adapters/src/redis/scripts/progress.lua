-- progress: ARGV = ns, ttl_ms, task_id, progress JSON, the task's `queued` slot hash and its
-- record slot hash ('' for an id that has none: its record is the string key `r:{id}`).
-- Stored beside an existing record, whose header is marked ("<attempt>:<terminal>:1|") so
-- later writes keep it; beside a `queued` record in its slot hash it is stored unmarked
-- (reads always look for it). Returns 0 for a task with no record at all.
local id = ARGV[3]
local pk = ARGV[1] .. ':p:' .. id
local slot = ARGV[6]
local cur
if slot == '' then
  local rk = ARGV[1] .. ':r:' .. id
  cur = redis.call('GETRANGE', rk, 0, 23)
  if cur ~= '' then
    redis.call('SET', pk, ARGV[4], 'PX', ARGV[2])
    redis.call('PEXPIRE', rk, ARGV[2])
    local a = string.match(cur, '^(%d+):%d:%d|')
    if a then redis.call('SETRANGE', rk, string.len(a) + 3, '1') end
    return 1
  end
else
  cur = redis.call('HGET', slot, id)
  if cur then
    redis.call('SET', pk, ARGV[4], 'PX', ARGV[2])
    local a = string.match(cur, '^(%d+):%d:%d|')
    if a then
      local at = string.len(a) + 4
      redis.call('HSET', slot, id, string.sub(cur, 1, at - 1) .. '1' .. string.sub(cur, at + 1))
    end
    redis.call('PEXPIRE', slot, ARGV[2])
    return 1
  end
end
if ARGV[5] == '' or redis.call('HEXISTS', ARGV[5], id) == 0 then return 0 end
redis.call('SET', pk, ARGV[4], 'PX', ARGV[2])
return 1
