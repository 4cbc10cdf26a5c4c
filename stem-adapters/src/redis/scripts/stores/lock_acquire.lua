-- KEYS[1] lock key; ARGV[1] owner; ARGV[2] ttl ms. Free (or expired) or already ours: take it.
local holder = redis.call('GET', KEYS[1])
if not holder or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
