-- dead_letter: ARGV = ns, queue, tag, token, record (DeadLetter JSON without id).
-- Finishes the delivery and appends the record to the queue's DLQ. Returns the DLQ id, or 0.
local q, tag = ARGV[2], ARGV[3]
local sk, id = check(q, tag, ARGV[4])
if not sk then return 0 end
finish(sk, id)
return push_dead(q, ARGV[5])
