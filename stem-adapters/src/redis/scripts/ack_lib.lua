-- Acks (library, used by ack.lua and finish.lua; needs common.lua). ack_receipts finishes the
-- receipts in ARGV[from..to], grouped by stream by the client: (queue, priority, lowest entry
-- id, highest entry id, count, then (entry id, token) * count) per stream; stale receipts
-- (entry no longer pending with that token) are skipped. Returns how many deliveries were
-- finished. Per stream the tokens are read with one XPENDING over the batch's id range
-- (falling back to one per entry when other deliveries crowd the range), and the live
-- deliveries are finished with one XACK and one XDEL.
local function ack_receipts(from, to)
  local n = 0
  local i = from
  while i <= to do
    local sk = k_stream(ARGV[i], ARGV[i + 1])
    local count = tonumber(ARGV[i + 4])
    local limit = count * 4
    local first = i + 5
    local last = first + 2 * count - 1
    local pending = {}
    local r = redis.pcall('XPENDING', sk, G, ARGV[i + 2], ARGV[i + 3], limit)
    local complete = type(r) == 'table' and not r.err
    if complete then
      for _, e in ipairs(r) do pending[e[1]] = e[4] end
      complete = #r < limit
    end
    local live = {}
    local nl = 0
    for j = first, last, 2 do
      local id = ARGV[j]
      local token = pending[id]
      if token == nil and not complete then
        local one = redis.pcall('XPENDING', sk, G, id, id, 1)
        if type(one) == 'table' and not one.err and one[1] then token = one[1][4] end
      end
      if token ~= nil and token == tonumber(ARGV[j + 1]) then
        nl = nl + 1
        live[nl] = id
      end
    end
    if nl > 0 then
      redis.call('XACK', sk, G, unpack(live))
      redis.call('XDEL', sk, unpack(live))
      n = n + nl
    end
    i = last + 1
  end
  return n
end
