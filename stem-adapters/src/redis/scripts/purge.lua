-- purge: ARGV = ns, queue. Deletes entries never delivered (after the group's
-- last-delivered-id) and every delayed envelope; in-flight deliveries stay. Returns the count.
local q = ARGV[2]
local n = 0
for p = 0, 9 do
  local sk = k_stream(q, tostring(p))
  if redis.call('EXISTS', sk) == 1 then
    local start = '-'
    for _, g in ipairs(redis.call('XINFO', 'GROUPS', sk)) do
      local name, last = nil, nil
      for f = 1, #g, 2 do
        if g[f] == 'name' then name = g[f + 1] elseif g[f] == 'last-delivered-id' then last = g[f + 1] end
      end
      if name == G and last then start = '(' .. last end
    end
    while true do
      local batch = redis.call('XRANGE', sk, start, '+', 'COUNT', 1000)
      if #batch == 0 then break end
      local ids = {}
      for j, e in ipairs(batch) do ids[j] = e[1] end
      redis.call('XDEL', sk, unpack(ids))
      n = n + #ids
      start = '(' .. ids[#ids]
    end
  end
end
n = n + redis.call('ZCARD', k_delayed(q))
redis.call('DEL', k_delayed(q))
return n
