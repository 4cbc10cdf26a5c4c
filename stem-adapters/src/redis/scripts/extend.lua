-- extend_lease: ARGV = ns, queue, tag, token, lease_ms. Restarts a live, unexpired lease with
-- the given length (re-claimed with JUSTID: idle time 0, same token, owner "<base>~<lease>");
-- never touches the entry itself. Returns 1, or 0 when the lease is lost.
local q, tag = ARGV[2], ARGV[3]
local sk, id, owner, idle, lease = check(q, tag, ARGV[4])
if not sk then return 0 end
if idle >= lease then return 0 end
redis.call('XCLAIM', sk, G, owner_base(owner) .. '~' .. ARGV[5], 0, id, 'JUSTID')
return 1
