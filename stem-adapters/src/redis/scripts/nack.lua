-- nack: ARGV = ns, queue, tag, token, requeue (1/0).
-- requeue: the delivery is released (re-claimed with JUSTID by "<owner>~0", a lease that has
-- run out), so the next consume that looks for expired leases redelivers it, with a new token;
-- otherwise the delivery is dropped. Returns 1, or 0 for a stale receipt.
local q, tag = ARGV[2], ARGV[3]
local sk, id, owner = check(q, tag, ARGV[4])
if not sk then return 0 end
if ARGV[5] == '1' then
  redis.call('XCLAIM', sk, G, owner_base(owner) .. '~0', 0, id, 'JUSTID')
else
  finish(sk, id)
end
return 1
