-- Status records (library, used by set_status.lua and finish.lua). set_records writes the
-- records ARGV[from..to], five arguments each: (task_id, attempt, terminal 1/0,
-- has_progress 1/0, value), where value = "<attempt>:<terminal>:0|<json>" (built by the client).
-- A record is stored as that value with a TTL; the third header field flips to 1 while a
-- separate progress key exists. The fencing rule of TaskStatus::may_replace is applied
-- against the stored header: an older attempt never overwrites a newer one; within one
-- attempt a terminal state is never replaced by a non-terminal one. Progress reported with
-- `progress` survives later writes that carry none. A terminal write is PUBLISHed on the
-- task's channel (payload: the value, then "\n" and the progress, if any).
local function set_records(ns, ttl, from, to)
  local written = 0
  for i = from, to, 5 do
    local id = ARGV[i]
    local attempt = tonumber(ARGV[i + 1])
    local term = ARGV[i + 2]
    local rk = ns .. ':r:' .. id
    local value = ARGV[i + 4]
    -- One call writes and returns the previous record; a fenced-out write puts it back.
    local old = redis.call('SET', rk, value, 'PX', ttl, 'GET')
    local ok = true
    local has_prog_key = false
    if old then
      local a, t, p = string.match(old, '^(%d+):(%d):(%d)|')
      if a then
        has_prog_key = p == '1'
        a = tonumber(a)
        if attempt ~= a then
          ok = attempt > a
        else
          ok = not (t == '1' and term == '0')
        end
      end
      if not ok then
        redis.call('SET', rk, old, 'PX', ttl)
      end
    end
    if ok then
      local prog = false
      if has_prog_key then
        local pk = ns .. ':p:' .. id
        if ARGV[i + 3] == '1' then
          redis.call('DEL', pk)
        else
          prog = redis.call('GET', pk)
          if prog then
            redis.call('PEXPIRE', pk, ttl)
            redis.call('SETRANGE', rk, string.len(ARGV[i + 1]) + 3, '1')
          end
        end
      end
      if term == '1' then
        if prog then value = value .. '\n' .. prog end
        redis.call('PUBLISH', ns .. ':done:' .. id, value)
      end
      written = written + 1
    end
  end
  return written
end
