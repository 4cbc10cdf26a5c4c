-- consume: ARGV = ns, consumer, max, default_lease_ms, nqueues, queue...
-- 1. promote due delayed envelopes into their streams;
-- 2. per priority 9..0 and per queue in order: first expired/released leases (XCLAIM, new
--    token), then new entries (XREADGROUP >), until `max` deliveries;
-- 3. record a lease (deadline) for every delivery.
-- Returns {n, (queue_index, priority, entry id, token, payload) * n}, `payload` being the
-- envelope (field `e`) when it is the entry's first field, else the entry's whole field/value
-- list (the client finds `e` in it, or dead-letters the entry); when n = 0 it returns {0, ms_until_next_due_or_-1, last_generated_id per stream
-- (priority 9..0, queue order)}. The hot path touches each entry as little as it can: every
-- table slot and string built here is paid per task.
local consumer = ARGV[2]
local max = tonumber(ARGV[3])
local dlease = tonumber(ARGV[4])
local nq = tonumber(ARGV[5])
local queues = {}
for i = 1, nq do queues[i] = ARGV[5 + i] end
local now = now_ms()

for i = 1, nq do
  local q = queues[i]
  local dk = k_delayed(q)
  local due = redis.call('ZRANGEBYSCORE', dk, '-inf', now, 'LIMIT', 0, 1000)
  if #due > 0 then
    for _, m in ipairs(due) do
      local p, vis, env = string.match(m, '^(%d)|(%d*)|(.*)$')
      if not p then p, vis, env = '0', '', m end
      store(q, p, 0, vis, env, now)
    end
    redis.call('ZREMRANGEBYRANK', dk, 0, #due - 1)
  end
end

local out = {0}
local k = 1
local n = 0
local leases = {}
local expired = {}
for i = 1, nq do
  leases[i] = {}
  local byp = {}
  local ex = redis.call('ZRANGEBYSCORE', k_leases(queues[i]), '-inf', now, 'LIMIT', 0, max)
  for _, m in ipairs(ex) do
    local p, id, token = string.match(m, '^(%d):(.+):(%d+)$')
    if p then
      if not byp[p] then byp[p] = {} end
      table.insert(byp[p], {id, tonumber(token), m})
    end
  end
  expired[i] = byp
end

local function deliver(i, p, entry, token)
  local id, fields = entry[1], entry[2]
  local vis = dlease
  -- Only an envelope with its own lease length has more than the one field `e`.
  if fields[3] or fields[1] ~= 'e' then
    for f = 1, #fields, 2 do
      if fields[f] == 'v' then vis = tonumber(fields[f + 1]) or dlease end
    end
  end
  local l = leases[i]
  local j = #l
  l[j + 1] = now + vis
  l[j + 2] = p .. ':' .. id .. ':' .. token
  n = n + 1
  out[k + 1] = i
  out[k + 2] = p
  out[k + 3] = id
  out[k + 4] = token
  if fields[1] == 'e' then out[k + 5] = fields[2] else out[k + 5] = fields end
  k = k + 5
end

for p = 9, 0, -1 do
  local ps = tostring(p)
  for i = 1, nq do
    if n >= max then break end
    local q = queues[i]
    local sk = k_stream(q, ps)
    local ids = expired[i][ps]
    if ids then
      for _, lease in ipairs(ids) do
        if n >= max then break end
        local id, token, member = lease[1], lease[2], lease[3]
        local got = redis.call('XCLAIM', sk, G, consumer, 0, id)
        -- The old lease goes; the redelivery gets the next token, so old receipts are stale.
        redis.call('ZREM', k_leases(q), member)
        if got[1] then
          deliver(i, ps, got[1], token + 1)
        else
          -- The entry is gone (deleted behind our back): nothing to deliver.
          redis.call('XACK', sk, G, id)
        end
      end
    end
    if n < max and redis.call('XLEN', sk) > 0 then
      local r = redis.pcall('XREADGROUP', 'GROUP', G, consumer, 'COUNT', max - n, 'STREAMS', sk, '>')
      if type(r) == 'table' and r.err then
        -- The group vanished (e.g. deleted by hand): recreate it and read again.
        redis.pcall('XGROUP', 'CREATE', sk, G, '0')
        r = redis.call('XREADGROUP', 'GROUP', G, consumer, 'COUNT', max - n, 'STREAMS', sk, '>')
      end
      if r then
        for _, e in ipairs(r[1][2]) do deliver(i, ps, e, 1) end
      end
    end
  end
end

for i = 1, nq do
  local l = leases[i]
  local lk = k_leases(queues[i])
  for s = 1, #l, 2000 do
    redis.call('ZADD', lk, unpack(l, s, math.min(s + 1999, #l)))
  end
end

if n > 0 then
  out[1] = n
  return out
end

-- Nothing ready: say when something may become ready and where to block.
local next_due = -1
for i = 1, nq do
  local q = queues[i]
  for _, k in ipairs({k_delayed(q), k_leases(q)}) do
    local first = redis.call('ZRANGE', k, 0, 0, 'WITHSCORES')
    if first[2] then
      local d = tonumber(first[2]) - now
      if d < 0 then d = 0 end
      if next_due < 0 or d < next_due then next_due = d end
    end
  end
end
out[2] = next_due
for p = 9, 0, -1 do
  for i = 1, nq do
    local sk = k_stream(queues[i], tostring(p))
    local last = '0-0'
    if redis.call('EXISTS', sk) == 1 then
      local info = redis.call('XINFO', 'STREAM', sk)
      for f = 1, #info, 2 do
        if info[f] == 'last-generated-id' then last = info[f + 1] end
      end
    end
    out[#out + 1] = last
  end
end
return out
