-- Status records (library, used by set_status.lua and finish.lua). set_records writes the
-- records ARGV[from..to], three arguments each: (task_id, has_progress 1/0, value), where
-- value = "<attempt>:<terminal 1/0>:0|<json>" (built by the client).
-- A record is stored as that value with a TTL; the third header field flips to 1 while a
-- separate progress key exists. The fencing rule of TaskStatus::may_replace is applied
-- against the stored header: an older attempt never overwrites a newer one; within one
-- attempt a terminal state is never replaced by a non-terminal one. Progress reported with
-- `progress` survives later writes that carry none. A terminal write is PUBLISHed on the
-- task's channel (payload: the value, then "\n" and the progress, if any).
local function set_records(ns, ttl, from, to)
  local written = 0
  local rprefix = ns .. ':r:'
  local dprefix = ns .. ':done:'
  for i = from, to, 3 do
    local id = ARGV[i]
    local value = ARGV[i + 2]
    local attempt, term = string.match(value, '^(%d+):(%d)')
    local rk = rprefix .. id
    -- One call writes and returns the previous record; a fenced-out write puts it back.
    local old = redis.call('SET', rk, value, 'PX', ttl, 'GET')
    local ok = true
    local has_prog_key = false
    if old then
      local a, t, p = string.match(old, '^(%d+):(%d):(%d)|')
      if a then
        has_prog_key = p == '1'
        if a ~= attempt then
          ok = tonumber(attempt) > tonumber(a)
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
        if ARGV[i + 1] == '1' then
          redis.call('DEL', pk)
        else
          prog = redis.call('GET', pk)
          if prog then
            redis.call('PEXPIRE', pk, ttl)
            redis.call('SETRANGE', rk, string.len(attempt) + 3, '1')
          end
        end
      end
      if term == '1' then
        if prog then value = value .. '\n' .. prog end
        redis.call('PUBLISH', dprefix .. id, value)
      end
      written = written + 1
    end
  end
  return written
end
