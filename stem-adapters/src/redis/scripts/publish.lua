-- publish: ARGV = ns, then (queue, priority, due_ms, vis_ms|'', envelope) per envelope.
local now = now_ms()
local n = 0
for i = 2, #ARGV, 5 do
  store(ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3], ARGV[i + 4], now)
  n = n + 1
end
return n
