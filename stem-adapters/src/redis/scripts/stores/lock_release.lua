-- KEYS[1] lock key; ARGV[1] owner. Only the live holder releases.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
