-- dlq_replay: ARGV = ns, dlq_queue, then (dlq_id, queue, priority, due_ms, vis_ms|'', envelope).
-- Each entry is removed from the DLQ and stored again, unless someone removed it first.
local dq = ARGV[2]
local now = now_ms()
local n = 0
for i = 3, #ARGV, 6 do
  if redis.call('HDEL', k_dlq(dq), ARGV[i]) == 1 then
    redis.call('ZREM', k_dlqi(dq), ARGV[i])
    store(ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3]), ARGV[i + 4], ARGV[i + 5], now)
    n = n + 1
  end
end
return n
