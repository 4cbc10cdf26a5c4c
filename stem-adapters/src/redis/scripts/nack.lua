-- nack: ARGV = ns, queue, tag, token, requeue (1/0).
-- requeue: the lease is released (score 0) so the next consume redelivers it first, with a
-- new token; otherwise the delivery is dropped. Returns 1, or 0 for a stale receipt.
local q, tag = ARGV[2], ARGV[3]
local sk, id, member = check(q, tag, ARGV[4])
if not sk then return 0 end
if ARGV[5] == '1' then
  redis.call('ZADD', k_leases(q), 'XX', 0, member)
else
  finish(q, member, sk, id)
end
return 1
