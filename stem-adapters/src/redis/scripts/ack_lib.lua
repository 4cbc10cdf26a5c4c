-- Acks (library, used by ack.lua and finish.lua; needs common.lua). ack_receipts finishes the
-- receipts in ARGV[from..to], grouped by queue: (queue, count, then (tag, token) * count) per
-- queue; stale receipts are skipped. Returns how many deliveries were finished. Leases are
-- checked with one ZMSCORE per queue and finished with one XACK, XDEL and ZREM per stream,
-- whatever the batch size. A tag is "<priority digit>:<entry id>".
local function ack_receipts(from, to)
  local n = 0
  local i = from
  while i <= to do
    local q = ARGV[i]
    local count = tonumber(ARGV[i + 1])
    local lk = k_leases(q)
    local first = i + 2
    local last = first + 2 * count - 1
    i = last + 1
    for s = first, last, 2000 do
      local e = math.min(s + 1999, last)
      local members = {}
      local m = 0
      for j = s, e, 2 do
        m = m + 1
        members[m] = ARGV[j] .. ':' .. ARGV[j + 1]
      end
      local scores = redis.call('ZMSCORE', lk, unpack(members))
      local streams = {}
      local sorder = {}
      local live = {}
      local nl = 0
      for j = 1, m do
        local sc = scores[j]
        if sc and sc ~= '0' then
          local tag = ARGV[s + 2 * (j - 1)]
          local p = string.sub(tag, 1, 1)
          local sk = k_stream(q, p)
          local ids = streams[sk]
          if not ids then
            ids = {}
            streams[sk] = ids
            sorder[#sorder + 1] = sk
          end
          ids[#ids + 1] = string.sub(tag, 3)
          nl = nl + 1
          live[nl] = members[j]
        end
      end
      for _, sk in ipairs(sorder) do
        redis.call('XACK', sk, G, unpack(streams[sk]))
        redis.call('XDEL', sk, unpack(streams[sk]))
      end
      if nl > 0 then
        redis.call('ZREM', lk, unpack(live))
      end
      n = n + nl
    end
  end
  return n
end
