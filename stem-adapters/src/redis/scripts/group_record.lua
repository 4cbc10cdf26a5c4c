-- group_record: ARGV = ns, group_id, index, succeeded 1/0, outcome JSON.
-- The first outcome per index wins (HSETNX); a failure counts itself in 'f' only when it won.
-- Succeeded members are the member fields that are not failures (see groups.rs).
-- Returns {total, succeeded, failed}, or {-1} for an unknown group, {-2} for a bad index.
local gk = ARGV[1] .. ':g:' .. ARGV[2]
local total = redis.call('HGET', gk, 'total')
if not total then return {-1} end
local index = tonumber(ARGV[3])
if index >= tonumber(total) then return {-2} end
if redis.call('HSETNX', gk, 'm' .. index, ARGV[5]) == 1 and ARGV[4] ~= '1' then
  redis.call('HINCRBY', gk, 'f', 1)
end
local c = redis.call('HMGET', gk, 'total', 's', 'f', 'claimed')
local fixed = 0
for k = 1, 4 do
  if c[k] then fixed = fixed + 1 end
end
local f = tonumber(c[3]) or 0
return {tonumber(total), redis.call('HLEN', gk) - fixed - f, f}
