-- broadcast: ARGV = ns, channel, envelope, maxlen. Appends to the channel's stream only when
-- it has subscribers (consumer groups); old messages are trimmed beyond maxlen.
local bk = ns .. ':bc:' .. ARGV[2]
if redis.call('EXISTS', bk) == 0 then return 0 end
if #redis.call('XINFO', 'GROUPS', bk) == 0 then return 0 end
redis.call('XADD', bk, 'MAXLEN', '~', ARGV[4], '*', 'e', ARGV[3])
return 1
