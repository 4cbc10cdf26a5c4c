-- consume: ARGV = ns, consumer, max, default_lease_ms, reclaim (1/0), nqueues, queue...
-- 1. promote due delayed envelopes into their streams;
-- 2. per priority 9..0 and per queue in order: first expired or released leases (when
--    `reclaim` is 1, or when nothing new is ready), then new entries (XREADGROUP >), until
--    `max` deliveries. Deliveries are owned by "<consumer>~<lease ms>" (see common.lua), an
--    envelope's own lease (field `v`) included.
-- Returns {n, mask, (queue_index, priority, entry id, token, payload) * n}: `mask` has bit p
-- set when the first queue's priority-p stream holds entries, `payload` is the envelope
-- (field `e`) when it is the entry's first field, else the entry's whole field/value list (the
-- client finds `e` in it, or dead-letters the entry). When n = 0 it returns
-- {0, mask, ms_until_next_due_or_-1, last_generated_id per stream (priority 9..0, queue order)}.
local consumer = ARGV[2]
local max = tonumber(ARGV[3])
local dlease = tonumber(ARGV[4])
local reclaim = ARGV[5] == '1'
local nq = tonumber(ARGV[6])
local queues = {}
for i = 1, nq do queues[i] = ARGV[6 + i] end
local now = now_ms()
local owner = consumer .. '~' .. dlease

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

-- Which streams hold entries (a stream never written to does not exist).
local live = {}
local mask = 0
for p = 9, 0, -1 do
  for i = 1, nq do
    local sk = k_stream(queues[i], tostring(p))
    if redis.call('XLEN', sk) > 0 then
      live[sk] = true
      if i == 1 then mask = mask + 2 ^ p end
    end
  end
end

local out = {0, mask}
local k = 2
local n = 0
-- Entries whose envelope asks for its own lease: {stream, id, lease} each.
local own = {}

local function deliver(i, p, sk, entry, token)
  local id, fields = entry[1], entry[2]
  -- Only an envelope with its own lease length has more than the one field `e`.
  if fields[3] or fields[1] ~= 'e' then
    for f = 1, #fields, 2 do
      if fields[f] == 'v' then
        local v = tonumber(fields[f + 1])
        if v and v ~= dlease then own[#own + 1] = {sk, id, v} end
      end
    end
  end
  n = n + 1
  out[k + 1] = i
  out[k + 2] = p
  out[k + 3] = id
  out[k + 4] = token
  if fields[1] == 'e' then out[k + 5] = fields[2] else out[k + 5] = fields end
  k = k + 5
end

local function take_expired(i, ps, sk)
  if n >= max then return end
  local expired = expired_leases(sk, max - n, false)
  for _, lease in ipairs(expired) do
    -- Claimed without JUSTID: the token goes up, so the old receipt is stale.
    local got = redis.call('XCLAIM', sk, G, owner, 0, lease[1])
    if got[1] then
      deliver(i, ps, sk, got[1], lease[2] + 1)
    end
    -- An entry deleted behind our back leaves the PEL with the claim: nothing to deliver.
  end
end

local function take_new(i, ps, sk)
  if n >= max then return end
  local r = redis.pcall('XREADGROUP', 'GROUP', G, owner, 'COUNT', max - n, 'STREAMS', sk, '>')
  if type(r) == 'table' and r.err then
    -- The group vanished (e.g. deleted by hand): recreate it and read again.
    redis.pcall('XGROUP', 'CREATE', sk, G, '0')
    r = redis.call('XREADGROUP', 'GROUP', G, owner, 'COUNT', max - n, 'STREAMS', sk, '>')
  end
  if r then
    for _, e in ipairs(r[1][2]) do deliver(i, ps, sk, e, 1) end
  end
end

local function pass(with_expired)
  for p = 9, 0, -1 do
    local ps = tostring(p)
    for i = 1, nq do
      if n >= max then return end
      local sk = k_stream(queues[i], ps)
      if live[sk] then
        if with_expired then take_expired(i, ps, sk) end
        take_new(i, ps, sk)
      end
    end
  end
end

pass(reclaim)
if n == 0 and not reclaim then pass(true) end

-- Owners are per worker process (and lease length), so a group collects the names of workers
-- long gone. At most every ten minutes per queue, drop the owners with nothing pending that
-- were idle for an hour (an owner still alive is simply created again by its next read).
if reclaim and redis.call('SET', ns .. ':gc:' .. queues[1], '1', 'PX', 600000, 'NX') then
  for p = 0, 9 do
    local sk = k_stream(queues[1], tostring(p))
    if redis.call('EXISTS', sk) == 1 then
      local owners = redis.pcall('XINFO', 'CONSUMERS', sk, G)
      if type(owners) == 'table' and not owners.err then
        for _, c in ipairs(owners) do
          local name, pending, idle = nil, nil, nil
          for f = 1, #c, 2 do
            if c[f] == 'name' then name = c[f + 1]
            elseif c[f] == 'pending' then pending = c[f + 1]
            elseif c[f] == 'idle' then idle = c[f + 1] end
          end
          if name and pending == 0 and idle and idle > 3600000 then
            redis.call('XGROUP', 'DELCONSUMER', sk, G, name)
          end
        end
      end
    end
  end
end

-- Envelopes with their own lease length move to an owner that says so (same token).
for _, o in ipairs(own) do
  redis.call('XCLAIM', o[1], G, consumer .. '~' .. o[3], 0, o[2], 'JUSTID')
end

if n > 0 then
  out[1] = n
  return out
end

-- Nothing ready: say when something may become ready and where to block.
local next_due = -1
local function sooner(d)
  if d < 0 then d = 0 end
  if next_due < 0 or d < next_due then next_due = d end
end
for i = 1, nq do
  local q = queues[i]
  local first = redis.call('ZRANGE', k_delayed(q), 0, 0, 'WITHSCORES')
  if first[2] then sooner(tonumber(first[2]) - now) end
  for p = 0, 9 do
    local sk = k_stream(q, tostring(p))
    if live[sk] then
      local _, left = expired_leases(sk, 0, true)
      if left >= 0 then sooner(left) end
    end
  end
end
out[3] = next_due
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
