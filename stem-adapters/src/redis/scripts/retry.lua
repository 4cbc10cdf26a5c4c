-- retry: ARGV = ns, queue, tag, token, new_queue, priority, due_ms, vis_ms|'', envelope.
-- Finishes the delivery and stores the new envelope (delayed when due later), atomically.
local q, tag = ARGV[2], ARGV[3]
local sk, id = check(q, tag, ARGV[4])
if not sk then return 0 end
finish(sk, id)
store(ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8], ARGV[9], now_ms())
return 1
