-- group_record_many: ARGV = ns, then per group: group_id, n, and n records of four arguments
-- each: index, member field ('m' .. index), succeeded 1/0, outcome JSON. Each record is
-- applied as group_record.lua applies one: the first outcome per index wins and is counted
-- once; a later record for the same index, in this call or an earlier one, changes nothing.
-- Succeeded members are the member fields that are not failures (see groups.rs), so only
-- failures move a counter ('f').
-- Redis runs a command called from Lua, every string Lua makes and every reply element at
-- several times the cost of the same work in a MULTI, so the client names the fields, a
-- group costs three commands however many records it carries (one HMGET of the fixed fields
-- and the members' fields, one HLEN, one HSET of the new outcomes), and the answer is four
-- values per group from which the client works out each record's counts. (Successes of a
-- group whose total the client knows skip the script altogether; see groups.rs.)
-- The script is one step, so nothing interleaves between the read and the write.
-- Returns per group, in argument order: total (-1 for an unknown group), succeeded and
-- failed as they stood before this call, and one character per record: '1' applied, '0'
-- already recorded, '2' index out of range.
local ns = ARGV[1]
local out = {}
local i = 2
while i <= #ARGV do
  local key = ns .. ':g:' .. ARGV[i]
  local n = tonumber(ARGV[i + 1])
  local first = i + 2
  local last = first + (n - 1) * 4
  local fields = {'total', 's', 'f', 'claimed'}
  for r = first, last, 4 do fields[#fields + 1] = ARGV[r + 1] end
  local c = redis.call('HMGET', key, unpack(fields))
  local flags = {}
  if not c[1] then
    out[#out + 1] = -1; out[#out + 1] = 0; out[#out + 1] = 0
    for k = 1, n do flags[k] = '0' end
  else
    local total = tonumber(c[1])
    local fixed = 0
    for k = 1, 4 do
      if c[k] then fixed = fixed + 1 end
    end
    local f0 = tonumber(c[3]) or 0
    local s0 = redis.call('HLEN', key) - fixed - f0
    local f = f0
    local have = {}
    local write = {}
    for r = first, last, 4 do
      local k = (r - first) / 4 + 1
      local field = ARGV[r + 1]
      if tonumber(ARGV[r]) >= total then
        flags[k] = '2'
      elseif have[field] or c[4 + k] then
        flags[k] = '0'
      else
        have[field] = true
        flags[k] = '1'
        write[#write + 1] = field
        write[#write + 1] = ARGV[r + 3]
        if ARGV[r + 2] ~= '1' then f = f + 1 end
      end
    end
    if f ~= f0 then
      redis.call('HSET', key, 'f', f, unpack(write))
    elseif #write > 0 then
      redis.call('HSET', key, unpack(write))
    end
    out[#out + 1] = total; out[#out + 1] = s0; out[#out + 1] = f0
  end
  out[#out + 1] = table.concat(flags)
  i = last + 4
end
return out
