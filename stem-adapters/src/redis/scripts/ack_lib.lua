-- Acks (library, used by ack.lua and finish.lua; needs common.lua). ack_receipts finishes the
-- receipts ARGV[from..to], (queue, tag, token) each; stale receipts are skipped. Returns how
-- many deliveries were finished. Leases are checked with one ZMSCORE per queue and finished
-- with one XACK, XDEL and ZREM per stream, whatever the batch size.
local function ack_receipts(from, to)
  local byq = {}
  local qorder = {}
  for i = from, to, 3 do
    local q = ARGV[i]
    local b = byq[q]
    if not b then
      b = {tags = {}, members = {}}
      byq[q] = b
      qorder[#qorder + 1] = q
    end
    b.tags[#b.tags + 1] = ARGV[i + 1]
    b.members[#b.members + 1] = ARGV[i + 1] .. ':' .. ARGV[i + 2]
  end
  local n = 0
  for _, q in ipairs(qorder) do
    local b = byq[q]
    local lk = k_leases(q)
    for s = 1, #b.members, 1000 do
      local e = math.min(s + 999, #b.members)
      local scores = redis.call('ZMSCORE', lk, unpack(b.members, s, e))
      local streams = {}
      local sorder = {}
      local live = {}
      for j = s, e do
        local sc = scores[j - s + 1]
        if sc and tonumber(sc) ~= 0 then
          local p, id = string.match(b.tags[j], '^(%d):(.+)$')
          if p then
            local sk = k_stream(q, p)
            local ids = streams[sk]
            if not ids then
              ids = {}
              streams[sk] = ids
              sorder[#sorder + 1] = sk
            end
            ids[#ids + 1] = id
            live[#live + 1] = b.members[j]
            n = n + 1
          end
        end
      end
      for _, sk in ipairs(sorder) do
        redis.call('XACK', sk, G, unpack(streams[sk]))
        redis.call('XDEL', sk, unpack(streams[sk]))
      end
      if #live > 0 then
        redis.call('ZREM', lk, unpack(live))
      end
    end
  end
  return n
end
