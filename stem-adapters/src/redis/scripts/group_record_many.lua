-- group_record_many: ARGV = ns, then four per record: group_id, index, succeeded 1/0,
-- outcome JSON. Each record is applied as group_record.lua applies one: the first outcome per
-- index wins (HSETNX) and is counted once. A group's counters are read once per call and
-- written back once per group at the end (HINCRBY by what this call added), all inside
-- this one script, so nothing can interleave.
-- Returns three integers per record, in order: {total, succeeded, failed} as they stand
-- right after that record, or {-1, 0, 0} for an unknown group, {-2, 0, 0} for a bad index.
local ns = ARGV[1]
local groups = {}
local touched = {}
local out = {}
for i = 2, #ARGV, 4 do
  local gid = ARGV[i]
  local g = groups[gid]
  if g == nil then
    local gk = ns .. ':g:' .. gid
    local c = redis.call('HMGET', gk, 'total', 's', 'f')
    if c[1] then
      g = {key = gk, total = tonumber(c[1]), s = tonumber(c[2]) or 0, f = tonumber(c[3]) or 0, ds = 0, df = 0}
    else
      g = false
    end
    groups[gid] = g
  end
  local n = #out
  if not g then
    out[n + 1] = -1; out[n + 2] = 0; out[n + 3] = 0
  else
    local index = tonumber(ARGV[i + 1])
    if index >= g.total then
      out[n + 1] = -2; out[n + 2] = 0; out[n + 3] = 0
    else
      if redis.call('HSETNX', g.key, 'm' .. index, ARGV[i + 3]) == 1 then
        if ARGV[i + 2] == '1' then
          g.s = g.s + 1; g.ds = g.ds + 1
        else
          g.f = g.f + 1; g.df = g.df + 1
        end
        if g.ds + g.df == 1 then touched[#touched + 1] = g end
      end
      out[n + 1] = g.total; out[n + 2] = g.s; out[n + 3] = g.f
    end
  end
end
for _, g in ipairs(touched) do
  if g.ds > 0 then redis.call('HINCRBY', g.key, 's', g.ds) end
  if g.df > 0 then redis.call('HINCRBY', g.key, 'f', g.df) end
end
return out
