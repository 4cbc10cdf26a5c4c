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

-- Create the stream and its consumer group on first use.
local function ensure_group(sk)
  if redis.call('EXISTS', sk) == 0 then
    redis.call('XGROUP', 'CREATE', sk, G, '0', 'MKSTREAM')
  end
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

-- A receipt is live when its lease exists, was not released (score 0), and the entry's
-- delivery count (the fencing token) still equals the receipt's token.
-- Returns the stream key, the entry id and the lease deadline, or nil.
local function check(q, tag, token)
  local sc = redis.call('ZSCORE', k_leases(q), tag)
  if not sc then return nil end
  sc = tonumber(sc)
  if sc == 0 then return nil end
  local p, id = string.match(tag, '^(%d):(.+)$')
  if not p then return nil end
  local sk = k_stream(q, p)
  local pe = redis.call('XPENDING', sk, G, id, id, 1)
  if not pe[1] or tonumber(pe[1][4]) ~= tonumber(token) then return nil end
  return sk, id, sc
end

-- Remove a delivery for good: acknowledge, delete the entry, drop its lease.
local function finish(q, tag, sk, id)
  redis.call('XACK', sk, G, id)
  redis.call('XDEL', sk, id)
  redis.call('ZREM', k_leases(q), tag)
end

-- Append a dead-letter record (JSON without its id; the id is the hash field).
local function push_dead(q, record)
  local id = redis.call('INCR', ns .. ':dlq-seq')
  redis.call('HSET', k_dlq(q), id, record)
  redis.call('ZADD', k_dlqi(q), id, id)
  return id
end

