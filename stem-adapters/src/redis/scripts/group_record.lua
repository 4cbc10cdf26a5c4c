-- group_record: ARGV = ns, group_id, index, succeeded 1/0, outcome JSON.
-- The first outcome per index wins (HSETNX) and is counted once.
-- Returns {total, succeeded, failed}, or {-1} for an unknown group, {-2} for a bad index.
local gk = ARGV[1] .. ':g:' .. ARGV[2]
local total = redis.call('HGET', gk, 'total')
if not total then return {-1} end
local index = tonumber(ARGV[3])
if index >= tonumber(total) then return {-2} end
if redis.call('HSETNX', gk, 'm' .. index, ARGV[5]) == 1 then
  if ARGV[4] == '1' then
    redis.call('HINCRBY', gk, 's', 1)
  else
    redis.call('HINCRBY', gk, 'f', 1)
  end
end
local c = redis.call('HMGET', gk, 'total', 's', 'f')
return {tonumber(c[1]), tonumber(c[2]), tonumber(c[3])}
