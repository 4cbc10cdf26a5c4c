-- set: ARGV = ns, ttl_ms, then (task_id, attempt, terminal 1/0, has_progress 1/0, json) per record.
-- A record is stored as "<attempt>:<terminal>|<json>" with a TTL. The fencing rule of
-- TaskStatus::may_replace is applied against the stored header: an older attempt never
-- overwrites a newer one; within one attempt a terminal state is never replaced by a
-- non-terminal one. Progress lives in its own key and survives later writes. A terminal
-- write is PUBLISHed on the task's channel (payload: json, then "\n" and the progress, if any).
local ns = ARGV[1]
local ttl = ARGV[2]
local written = 0
for i = 3, #ARGV, 5 do
  local id = ARGV[i]
  local attempt = tonumber(ARGV[i + 1])
  local term = ARGV[i + 2]
  local rk = ns .. ':r:' .. id
  local ok = true
  local cur = redis.call('GETRANGE', rk, 0, 23)
  if cur ~= '' then
    local a, t = string.match(cur, '^(%d+):(%d)|')
    if a then
      a = tonumber(a)
      if attempt ~= a then
        ok = attempt > a
      else
        ok = not (t == '1' and term == '0')
      end
    end
  end
  if ok then
    local json = ARGV[i + 4]
    redis.call('SET', rk, ARGV[i + 1] .. ':' .. term .. '|' .. json, 'PX', ttl)
    local pk = ns .. ':p:' .. id
    local prog = false
    if ARGV[i + 3] == '1' then
      redis.call('DEL', pk)
    else
      prog = redis.call('GET', pk)
      if prog then redis.call('PEXPIRE', pk, ttl) end
    end
    if term == '1' then
      local msg = json
      if prog then msg = json .. '\n' .. prog end
      redis.call('PUBLISH', ns .. ':done:' .. id, msg)
    end
    written = written + 1
  end
end
return written
