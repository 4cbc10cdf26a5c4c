-- extend_lease: ARGV = ns, queue, tag, token, lease_ms. Moves the deadline of a live,
-- unexpired lease; never touches the entry itself. Returns 1, or 0 when the lease is lost.
local q, tag = ARGV[2], ARGV[3]
local sk, _, member, deadline = check(q, tag, ARGV[4])
if not sk then return 0 end
local now = now_ms()
if deadline <= now then return 0 end
redis.call('ZADD', k_leases(q), 'XX', now + tonumber(ARGV[5]), member)
return 1
