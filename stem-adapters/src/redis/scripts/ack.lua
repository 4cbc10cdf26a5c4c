-- ack: ARGV = ns, then (queue, tag, token) per receipt. Stale receipts are skipped.
-- Returns how many deliveries were finished.
local acks = {}
local order = {}
local n = 0
for i = 2, #ARGV, 3 do
  local q, tag = ARGV[i], ARGV[i + 1]
  local sk, id, member = check(q, tag, ARGV[i + 2])
  if sk then
    local a = acks[sk]
    if not a then
      a = {lk = k_leases(q), ids = {}, tags = {}}
      acks[sk] = a
      order[#order + 1] = sk
    end
    a.ids[#a.ids + 1] = id
    a.tags[#a.tags + 1] = member
    n = n + 1
  end
end
for _, sk in ipairs(order) do
  local a = acks[sk]
  for s = 1, #a.ids, 1000 do
    local e = math.min(s + 999, #a.ids)
    redis.call('XACK', sk, G, unpack(a.ids, s, e))
    redis.call('XDEL', sk, unpack(a.ids, s, e))
    redis.call('ZREM', a.lk, unpack(a.tags, s, e))
  end
end
return n
