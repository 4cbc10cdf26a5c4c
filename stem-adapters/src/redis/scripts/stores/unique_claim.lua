-- KEYS[1] claim key; ARGV[1] task id; ARGV[2] ttl ms. Returns false when claimed, else the holder.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return false
end
return redis.call('GET', KEYS[1])
