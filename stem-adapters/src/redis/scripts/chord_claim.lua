-- chord_claim: ARGV = ns, group_id. Exactly one caller ever gets 1.
local gk = ARGV[1] .. ':g:' .. ARGV[2]
if redis.call('EXISTS', gk) == 0 then return 0 end
return redis.call('HSETNX', gk, 'claimed', 1)
