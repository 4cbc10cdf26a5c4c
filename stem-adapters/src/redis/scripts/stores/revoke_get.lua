-- KEYS[1] revokes hash; KEYS[2] expiry zset; ARGV[1] task id. The revoke if still live.
local exp = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not exp then return false end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if tonumber(exp) <= now then return false end
return redis.call('HGET', KEYS[1], ARGV[1])
