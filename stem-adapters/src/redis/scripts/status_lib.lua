-- Status records (library, used by set_status.lua and finish.lua). set_records writes the
-- records ARGV[from..to], four arguments each: (task_id, has_progress 1/0, value, slot),
-- where value = "<attempt>:<terminal 1/0>:0|<json>" (built by the client) and slot names the
-- record's slot hash for a time-ordered id ('' for other ids, whose record is the string key
-- `r:{id}`).
-- A record is stored as that value with a TTL (a slot hash's TTL is renewed by every write
-- into it); the third header field flips to 1 while a separate progress key exists. The
-- fencing rule of TaskStatus::may_replace is applied against the stored header: an older
-- attempt never overwrites a newer one; within one attempt a terminal state is never
-- replaced by a non-terminal one. Progress reported with `progress` survives later writes
-- that carry none. A terminal write is PUBLISHed on the task's channel (payload: the value,
-- then "\n" and the progress, if any).

-- Whether a record with header `new_attempt`/`new_term` may replace `old`, and whether `old`
-- had a separate progress key.
local function may_replace(old, new_attempt, new_term)
  if not old then return true, false end
  local a, t, p = string.match(old, '^(%d+):(%d):(%d)|')
  if not a then return true, false end
  if a ~= new_attempt then return tonumber(new_attempt) > tonumber(a), p == '1' end
  return not (t == '1' and new_term == '0'), p == '1'
end

local function set_records(ns, ttl, from, to)
  local written = 0
  local rprefix = ns .. ':r:'
  local dprefix = ns .. ':done:'
  for i = from, to, 4 do
    local id = ARGV[i]
    local value = ARGV[i + 2]
    local slot = ARGV[i + 3]
    local attempt, term = string.match(value, '^(%d+):(%d)')
    local rk = rprefix .. id
    local ok, has_prog_key
    if slot == '' then
      -- One call writes and returns the previous record; a fenced-out write puts it back.
      local old = redis.call('SET', rk, value, 'PX', ttl, 'GET')
      ok, has_prog_key = may_replace(old, attempt, term)
      if not ok then redis.call('SET', rk, old, 'PX', ttl) end
    else
      ok, has_prog_key = may_replace(redis.call('HGET', slot, id), attempt, term)
    end
    if ok then
      local prog = false
      local stored = value
      if has_prog_key then
        local pk = ns .. ':p:' .. id
        if ARGV[i + 1] == '1' then
          redis.call('DEL', pk)
        else
          prog = redis.call('GET', pk)
          if prog then
            redis.call('PEXPIRE', pk, ttl)
            -- The record keeps pointing at the progress key.
            local at = string.len(attempt) + 4
            if slot == '' then
              redis.call('SETRANGE', rk, at - 1, '1')
            else
              stored = string.sub(value, 1, at - 1) .. '1' .. string.sub(value, at + 1)
            end
          end
        end
      end
      if slot ~= '' then
        redis.call('HSET', slot, id, stored)
        redis.call('PEXPIRE', slot, ttl)
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
