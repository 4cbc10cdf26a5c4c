-- KEYS[1] lock key; ARGV[1] owner; ARGV[2] ttl ms. Only the live holder renews.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
