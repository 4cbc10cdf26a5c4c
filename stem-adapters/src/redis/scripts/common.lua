-- Shared helpers, prepended to every broker script (see scripts.rs). ARGV[1] is the namespace.
local ns = ARGV[1]
local G = 'stem'

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function k_stream(q, p) return ns .. ':q:' .. q .. ':' .. p end
local function k_delayed(q) return ns .. ':d:' .. q end
local function k_dlq(q) return ns .. ':dlq:' .. q end
local function k_dlqi(q) return ns .. ':dlqi:' .. q end

-- Create the stream and its consumer group on first use (checked once per script call).
local known = {}
local function ensure_group(sk)
  if known[sk] then return end
  if redis.call('EXISTS', sk) == 0 then
    redis.call('XGROUP', 'CREATE', sk, G, '0', 'MKSTREAM')
  end
  known[sk] = true
end

-- Store one envelope: in its priority stream when due, else in the queue's delayed ZSET.
-- `vis` is the envelope's own lease length in ms ('' when it has none).
local function store(q, p, due, vis, env, now)
  if due > now then
    redis.call('ZADD', k_delayed(q), due, p .. '|' .. vis .. '|' .. env)
  else
    local sk = k_stream(q, p)
    ensure_group(sk)
    if vis ~= '' then
      redis.call('XADD', sk, '*', 'e', env, 'v', vis)
    else
      redis.call('XADD', sk, '*', 'e', env)
    end
  end
end

-- Leases live in each stream's pending entries list (PEL) of group G. A delivery's owner is
-- the consumer "<worker>~<lease ms>", so the PEL itself says how long each lease lasts: a
-- delivery has expired once its idle time reaches that lease ("~0": released, ready again at
-- once). The PEL's delivery counter is the fencing token: XREADGROUP gives 1 and every
-- reclaim (XCLAIM without JUSTID) adds one; renewals and releases re-claim with JUSTID, which
-- resets the idle time (and owner) but keeps the token. A receipt (tag "<priority>:<entry
-- id>", token) is live while its entry is pending with that token.

-- Lease length in ms from an owner name (0 when it has none).
local function lease_of(owner)
  return tonumber(string.match(owner, '~(%d+)$')) or 0
end

-- The owner name without its lease.
local function owner_base(owner)
  return string.match(owner, '^(.*)~%d+$') or owner
end

-- For a live receipt: the stream key, the entry id, its owner, idle ms and lease ms; else nil.
local function check(q, tag, token)
  local p = string.sub(tag, 1, 1)
  if string.sub(tag, 2, 2) ~= ':' or not string.match(p, '^%d$') then return nil end
  local sk, id = k_stream(q, p), string.sub(tag, 3)
  local r = redis.pcall('XPENDING', sk, G, id, id, 1)
  if type(r) ~= 'table' or r.err or not r[1] then return nil end
  local e = r[1]
  if tonumber(e[4]) ~= tonumber(token) then return nil end
  return sk, id, e[2], tonumber(e[3]), lease_of(e[2])
end

-- Remove a delivery for good: acknowledge and delete the entry.
local function finish(sk, id)
  redis.call('XACK', sk, G, id)
  redis.call('XDEL', sk, id)
end

-- Pending deliveries of stream `sk` whose lease has run out: {{id, token}, ...} (oldest
-- first, at most `max`), plus the ms until the next live lease runs out (-1: none; only
-- computed when `full`) and how many deliveries are pending in all. Cheap when nothing expired: the PEL summary names the owners, and
-- unless `full` only entries idle at least the shortest owner lease are listed.
local function expired_leases(sk, max, full)
  local summary = redis.pcall('XPENDING', sk, G)
  if type(summary) ~= 'table' or summary.err or tonumber(summary[1]) == 0 then return {}, -1, 0 end
  local shortest = 0
  if not full then
    shortest = nil
    for _, c in ipairs(summary[4]) do
      local l = lease_of(c[1])
      if not shortest or l < shortest then shortest = l end
    end
  end
  local out = {}
  local next_due = -1
  for _, e in ipairs(redis.call('XPENDING', sk, G, 'IDLE', shortest or 0, '-', '+', 1000)) do
    local left = lease_of(e[2]) - tonumber(e[3])
    if left <= 0 then
      if #out < max then out[#out + 1] = {e[1], tonumber(e[4])} end
    elseif next_due < 0 or left < next_due then
      next_due = left
    end
  end
  return out, next_due, tonumber(summary[1])
end

-- Append a dead-letter record (JSON without its id; the id is the hash field).
local function push_dead(q, record)
  local id = redis.call('INCR', ns .. ':dlq-seq')
  redis.call('HSET', k_dlq(q), id, record)
  redis.call('ZADD', k_dlqi(q), id, id)
  return id
end

