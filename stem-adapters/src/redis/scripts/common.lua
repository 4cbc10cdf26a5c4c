-- Shared helpers, prepended to every broker script (see scripts.rs). ARGV[1] is the namespace.
local ns = ARGV[1]
local G = 'stem'

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function k_stream(q, p) return ns .. ':q:' .. q .. ':' .. p end
local function k_leases(q) return ns .. ':l:' .. q end
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

-- Leases are members "{priority}:{entry id}:{token}" of the queue's lease ZSET; the token
-- (fencing number) grows with each delivery of the entry. A receipt (tag "{priority}:{entry
-- id}", token) is live when its member exists and was not released (score 0).
-- Returns the stream key, the entry id, the lease member and its deadline, or nil.
local function check(q, tag, token)
  local member = tag .. ':' .. token
  local sc = redis.call('ZSCORE', k_leases(q), member)
  if not sc then return nil end
  sc = tonumber(sc)
  if sc == 0 then return nil end
  local p, id = string.match(tag, '^(%d):(.+)$')
  if not p then return nil end
  return k_stream(q, p), id, member, sc
end

-- Remove a delivery for good: acknowledge, delete the entry, drop its lease.
local function finish(q, member, sk, id)
  redis.call('XACK', sk, G, id)
  redis.call('XDEL', sk, id)
  redis.call('ZREM', k_leases(q), member)
end

-- Append a dead-letter record (JSON without its id; the id is the hash field).
local function push_dead(q, record)
  local id = redis.call('INCR', ns .. ':dlq-seq')
  redis.call('HSET', k_dlq(q), id, record)
  redis.call('ZADD', k_dlqi(q), id, id)
  return id
end

