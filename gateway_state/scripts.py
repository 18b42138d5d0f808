"""Lua scripts: each is one atomic Redis round trip of the picker's request path.

On a Redis Cluster all keys one call touches share one hash tag (keys): KEYS[1]
names that slot, and the other keys are derived from the pool prefix (ARGV[1]).
On one Redis a call may touch the pool's keys and its index's at once (a lookup
and an admission carrying its index write are one call each there).
Every lease and timestamp comes from Redis's own clock (TIME), never a caller's:
one process with a skewed clock can neither expire the others nor outlive its
lease. (Redis 5 and later replicate a script's effects, so TIME is allowed
before writes.)
"""

_NOW_MS = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

# The prefixes of a pool's index keys (keys.bucket_prefix, keys.endpoint_prefix), from
# its pool prefix "gw:{pool}:" in ARGV[1].
_INDEX_PREFIXES = """
local prefix = ARGV[1]
local pool_name = string.sub(prefix, 5, -3)
local function bucket_prefix(b) return 'gw:{' .. pool_name .. '|b' .. b .. '}:' end
local function endpoint_prefix(e)
  return 'gw:{' .. pool_name .. '|e|' .. string.sub(redis.sha1hex(e), 1, 8) .. '}:' .. e .. ':'
end
-- A list of block hashes (placement_store.hash_list): "W:" then hashes of W characters one after
-- the other, or hashes joined by spaces. Returns how many, and a function giving the i-th: a
-- packed list is read only where asked (a search probes a dozen of a long prompt's hashes, an
-- index write of a held prompt touches its new ones), never split whole.
local function hash_list(s)
  local width, from = string.match(s, '^(%d+):()')
  if width then
    width = tonumber(width)
    return (#s - from + 1) / width, function(i) return string.sub(s, from + (i - 1) * width, from + i * width - 1) end
  end
  local list = {}
  for h in string.gmatch(s, '%S+') do table.insert(list, h) end
  return #list, function(i) return list[i] end
end
"""

# Keeping a replica's in-flight record and the pool's total (keys.inflight_total) in
# step: every change to one goes to the other in the same script, so the total is
# the sum of the records (PUBLISH rebuilds it from them on every heartbeat, which
# heals whatever a lost call or an ended lease left behind).
_INFLIGHT_HELPERS = """
local function count(prefix, record, field, amount)
  redis.call('HINCRBY', record, field, amount)
  redis.call('HINCRBY', prefix .. 'inflight', field, amount)
end
local function uncount(prefix, record, field, amount, all)
  local have = tonumber(redis.call('HGET', record, field) or 0)
  local gone = all and have or math.min(have, amount)
  if gone <= 0 then return end
  if have <= gone then redis.call('HDEL', record, field) else redis.call('HINCRBY', record, field, -gone) end
  if redis.call('HINCRBY', prefix .. 'inflight', field, -gone) <= 0 then
    redis.call('HDEL', prefix .. 'inflight', field)
  end
end
"""

# A held block is written again only when its recency is older than this share of
# the endpoint's turnover: how long its least recent block has gone unused (its
# LRU is full), or the prefix lifetime (it is not). A block used more often than that
# is rewritten at most once per share, and never reaches the eviction end.
REFRESH_SHARE = 4

# The writes that follow decisions, seven arguments each, applied in order by
# `apply(first, last)` over ARGV[first..last] (the pool prefix is ARGV[1]):
#
# - "i", endpoint, prefix ttl_ms, endpoint capacity in blocks, the blocks the
#   endpoint held at the decision (the lookup's match), the prompt's bucket, the
#   block hashes (a list, `hash_list`): the endpoint now holds every block. The
#   endpoint's blocks form an LRU bounded by capacity (keys.endpoint_lru: members
#   "hash/bucket", scores ms * 1024 + a depth slot), and within one prompt deeper
#   blocks score lower, so eviction takes leaves first, as the model server's own
#   cache does. Only what changed is written: the held blocks keep their recency
#   while it is younger than a share of the endpoint's turnover (REFRESH_SHARE), and
#   the new blocks then take theirs below the deepest held one; otherwise the whole
#   prompt is written at now. Both halves at once: "l" then "h" and "d" below.
# - "l", the same arguments: the LRU's half alone (the endpoint's own slot); the
#   script's result says which blocks were written and which evicted, for "h" and
#   "d" calls to the buckets' slots.
# - "h", endpoint, ttl_ms (0: none), "", "", bucket, block hashes: the blocks'
#   holders include the endpoint (until ttl_ms unless written again).
# - "d", endpoint, "", "", "", bucket, block hashes: the blocks' holders do not.
# - "r", replica, endpoint, uncached prompt blocks, model ("" for none), "", "": one
#   in-flight request ended; figures lost to a Redis flush never go negative.
# - "s", endpoint, ttl_ms, "", "", bucket, the block hashes: in a pool whose index
#   comes from engine events, the endpoint is taken to hold the blocks for ttl_ms
#   (speculative entries), until its engine's event says so.
#
# `apply` returns how many blocks the index writes evicted, and for each "l" write
# in order {index of the first block written, evicted "hash/bucket" members...}.
WRITE_ARGS = 7

# What a Redis with an append-only file keeps across its restart. The request
# path's bookkeeping (in-flight counts, the prefill backlog, the replicas' leases,
# speculative entries) lives for a lease or less, and every replica's heartbeat
# writes its own figures again (PUBLISH, itself kept), so a script writes it for the
# replicas alone (`passing()`, a Sentinel failover keeps it): after a restart the
# last heartbeat's figures stand until the next. The prefix index (`lasting()`, the
# default) goes to both. The file then grows by 83 bytes a decision instead of 2,037 in a
# pool indexed from engine events, 1,237 instead of 2,521 in an approximate one
# (docs/capacity.md), and Redis rewrites it (a fork) that much less often.
_REPLICATION = """
local replicas_only = redis.REPL_REPLICA or redis.REPL_SLAVE
local function passing() redis.set_repl(replicas_only) end
local function lasting() redis.set_repl(redis.REPL_ALL) end
"""

_WRITE_OPS = _REPLICATION + _INDEX_PREFIXES + _INFLIGHT_HELPERS + """
local function speculate(endpoint, ttl, bucket, hashes)
  local bp = bucket_prefix(bucket)
  for h in string.gmatch(hashes, '%S+') do
    local sk = bp .. 'spec:' .. h
    redis.call('HSET', sk, endpoint, now + ttl)
    if redis.call('PTTL', sk) < ttl then redis.call('PEXPIRE', sk, ttl) end
  end
end
local function hold(endpoint, ttl, bucket, count, block, first)
  local bp = bucket_prefix(bucket)
  for i = first, count do
    local bk = bp .. 'pfx:' .. block(i)
    redis.call('HSET', bk, endpoint, now)
    if ttl > 0 then redis.call('PEXPIRE', bk, ttl) end
  end
end
local function unhold_members(endpoint, members)
  for _, m in ipairs(members) do
    local h, b = string.match(m, '^(.-)/(%d+)$')
    if h then redis.call('HDEL', bucket_prefix(b) .. 'pfx:' .. h, endpoint) end
  end
end
-- The LRU's half of an index write: returns the index of the first block written, and the members evicted.
local function remember(endpoint, ttl, cap, held, bucket, count, block)
  local lru = endpoint_prefix(endpoint) .. 'lru'
  local tag = '/' .. bucket
  local size = redis.call('ZCARD', lru)
  local first, top = 1, now * 1024 + 1023  -- write blocks[first..], the first at score top
  if held > 0 and held <= count then
    local score = redis.call('ZSCORE', lru, block(held) .. tag)
    if score then
      local turnover = ttl
      if size >= cap then
        local oldest = redis.call('ZRANGE', lru, 0, 0, 'WITHSCORES')
        turnover = math.min(ttl, now - math.floor(tonumber(oldest[2]) / 1024))
      end
      if (now - math.floor(tonumber(score) / 1024)) * """ + str(REFRESH_SHARE) + """ <= turnover then
        first, top = held + 1, tonumber(score) - 1
      end
    end
  end
  if first > count then return first, {} end
  for i = first, count do redis.call('ZADD', lru, top - (i - first), block(i) .. tag) end
  redis.call('PEXPIRE', lru, ttl)
  size = redis.call('ZCARD', lru)
  local evicted = {}
  if size > cap then
    local gone = redis.call('ZPOPMIN', lru, size - cap)
    for j = 1, #gone, 2 do table.insert(evicted, gone[j]) end
  end
  return first, evicted
end
local function release(replica, endpoint, work, model)
  local ik = prefix .. 'inflight:' .. replica
  local last = tonumber(redis.call('HGET', ik, endpoint) or 0) <= 1
  uncount(prefix, ik, endpoint, 1, false)
  if work > 0 then uncount(prefix, ik, endpoint .. '|work', work, last) end
  if model ~= '' then uncount(prefix, ik, endpoint .. '@' .. model, 1, last) end
end
local function apply(first, last)
  local evicted, results = 0, {}
  for w = first, last, """ + str(WRITE_ARGS) + """ do
    local op, endpoint = ARGV[w], ARGV[w + 1]
    if op == 'r' or op == 's' then passing() else lasting() end
    if op == 'i' or op == 'l' then
      local count, block = hash_list(ARGV[w + 6])
      local from, gone = remember(endpoint, tonumber(ARGV[w + 2]), tonumber(ARGV[w + 3]), tonumber(ARGV[w + 4]),
                                  ARGV[w + 5], count, block)
      evicted = evicted + #gone
      if op == 'i' then
        hold(endpoint, tonumber(ARGV[w + 2]), ARGV[w + 5], count, block, from)
        unhold_members(endpoint, gone)
      else
        table.insert(gone, 1, from)
        table.insert(results, gone)
      end
    elseif op == 'h' then
      local count, block = hash_list(ARGV[w + 6])
      hold(endpoint, tonumber(ARGV[w + 2]), ARGV[w + 5], count, block, 1)
    elseif op == 'd' then
      local bp = bucket_prefix(ARGV[w + 5])
      for h in string.gmatch(ARGV[w + 6], '%S+') do redis.call('HDEL', bp .. 'pfx:' .. h, endpoint) end
    elseif op == 'r' then
      release(ARGV[w + 1], ARGV[w + 2], tonumber(ARGV[w + 3]), ARGV[w + 4])
    elseif op == 's' then
      speculate(endpoint, tonumber(ARGV[w + 2]), ARGV[w + 5], ARGV[w + 6])
    else
      error('unknown write ' .. op)
    end
  end
  return evicted, results
end
"""

# KEYS[1] = a key of the pool's slot, its pickers zset (or, for the index part
# alone, any key of the bucket's slot). ARGV = pool prefix, replica to leave out ("" for none), the block hashes
# in one argument (a list, `hash_list`: one argument packs and parses in half the
# time of 256), "1" when the pool's index comes from engine events (then a block's
# holders also count the pickers' speculative entries not yet expired), the prompt's bucket
# (keys.index_bucket), and which part to run: "load", "index" or "" for both (on
# one Redis the whole lookup is one call; on a cluster the pool's shard answers
# the load part and the bucket's shard the index part, at once), then releases to
# apply first (_WRITE_OPS "r", with the load part only): a request that ended
# since the replica's last call rides on its next lookup instead of a call of its
# own, and the figures read count it.
# Returns {inflight_flat, matched_flat, backlog_flat}:
# in-flight figures of the pool less the left-out replica's own record (fields
# "<endpoint>" count requests, "<endpoint>|work" their uncached prompt blocks; a
# replica knows its own exactly), per endpoint the number of leading prompt blocks
# it holds, and per endpoint its prefill backlog as recorded by ADMIT: blocks, then
# their age in ms. The pool's figures are one record (keys.inflight_total) that
# every admission and release keeps beside the replica's own, so the cost does not
# grow with the replicas: two records are read however many there are.
#
# Block hashes are chained, and each endpoint's recorded blocks are prefix-closed:
# INDEX gives a prompt's blocks recencies that fall with depth, and eviction takes
# the least recent first. So along the prompt the set of holders only shrinks, and a
# binary search finds the deepest block any endpoint not yet matched holds: one
# search per distinct match length, a dozen reads for a 256-block prompt instead
# of one per block. A prompt whose first block nobody holds matches nothing.
LOOKUP = _NOW_MS + _WRITE_OPS + """
local part = ARGV[6]
local out_inflight, out_matched, out_backlog = {}, {}, {}
if part ~= 'index' then
  apply(7, #ARGV)
  local own = {}
  if ARGV[2] ~= '' then
    local kv = redis.call('HGETALL', prefix .. 'inflight:' .. ARGV[2])
    for i = 1, #kv, 2 do own[kv[i]] = tonumber(kv[i + 1]) end
  end
  local total = redis.call('HGETALL', prefix .. 'inflight')
  for i = 1, #total, 2 do
    local n = tonumber(total[i + 1]) - (own[total[i]] or 0)
    if n > 0 then
      table.insert(out_inflight, total[i])
      table.insert(out_inflight, tostring(n))
    end
  end
  local recorded = redis.call('HGETALL', prefix .. 'prefill')
  for i = 1, #recorded, 2 do
    local blocks, at = string.match(recorded[i + 1], '^([^|]+)|(%d+)$')
    if blocks then
      table.insert(out_backlog, recorded[i])
      table.insert(out_backlog, blocks)
      table.insert(out_backlog, tostring(now - tonumber(at)))
    end
  end
end
if part ~= 'load' and ARGV[3] ~= '' then
  local bp = bucket_prefix(ARGV[5])
  local count, block = hash_list(ARGV[3])
  local matched = {}
  local speculative = ARGV[4] == '1'
  local function unmatched_holders(i)
    local out, seen, h = {}, {}, block(i)
    for _, e in ipairs(redis.call('HKEYS', bp .. 'pfx:' .. h)) do
      if not matched[e] then
        table.insert(out, e)
        seen[e] = true
      end
    end
    if speculative then
      local kv = redis.call('HGETALL', bp .. 'spec:' .. h)
      for j = 1, #kv, 2 do
        local e = kv[j]
        if not matched[e] and not seen[e] and tonumber(kv[j + 1]) > now then table.insert(out, e) end
      end
    end
    return out
  end
  local first, hi = 1, count
  while hi >= first do
    local found = unmatched_holders(first)
    if #found == 0 then break end
    local depth, lo, up = first, first + 1, hi
    while lo <= up do
      local mid = math.floor((lo + up) / 2)
      local holders = unmatched_holders(mid)
      if #holders > 0 then depth, found, lo = mid, holders, mid + 1 else up = mid - 1 end
    end
    for _, e in ipairs(found) do matched[e] = depth end
    hi = depth - 1
  end
  for e, n in pairs(matched) do
    table.insert(out_matched, e)
    table.insert(out_matched, tostring(n))
  end
end
return {out_inflight, out_matched, out_backlog}
"""

# The writes that follow decisions, off the request path, as many as have gathered
# in one call when no admission carried them (a replica sends its next batch of a
# pool when the last one is answered). KEYS[1] = a key of the slot the writes
# touch: on one Redis any; on a cluster the pool's (releases), an endpoint's ("l"),
# or a bucket's ("h", "d", "s"). ARGV = pool prefix, then the writes (_WRITE_OPS).
# Returns {blocks the index writes evicted, the "l" writes' results}.
WRITES = _NOW_MS + _WRITE_OPS + """
local evicted, results = apply(2, #ARGV)
return {evicted, results}
"""

# KEYS[1] = pickers zset. ARGV = pool prefix, replica, lease_ms, model ("" for
# none), how many options, the re-weighing (per request, per uncached block, tie
# margin, floor), how many writes come first, then the options (ADMIT_OPTION_ARGS
# each: endpoint, its uncached prompt blocks, the pool's requests and their
# uncached blocks there in the caller's view, its own included (-1: unknown, no
# re-weighing), its total score in the decision, its prefill speed in blocks per
# second, 0 unknown),
# then writes (_WRITE_OPS): first those that gathered since the replica's last
# call (releases, say), applied whatever happens, then the decision's own (its
# prompt's blocks, written for the first option), applied only if the first
# option is admitted. On a cluster the writes are those of the pool's slot alone
# (releases).
#
# The options are the decision's endpoints in the order it ranks them, the
# chosen first. Each option's score is re-weighed on the pool's figures there
# now, the replica's own record included (its own admissions since the caller's
# view count as any other replica's would: a concurrent decision of the same
# replica that switched to this endpoint weighs on it): less per request more than
# the caller's view held (more per one fewer) and per uncached block more (a
# release's blocks were mostly computed already, so fewer count nothing). The first
# option within the tie margin of the best re-weighed score is admitted; none, if
# the best fell below the floor (another endpoint may be best now: the caller
# decides again on fresh figures instead of doubling up), and the script then
# writes nothing of its own and returns 0. A single option at weight 1 per
# request, 0 per block, margin 0 and floor 0 is the plain check: refused when the
# pool's requests there passed what the caller saw.
#
# Admitting counts one request, its uncached prompt blocks and one for its model
# ("<endpoint>@<model>") in flight at the endpoint, in the replica's record and
# the pool's total, and adds the blocks to the endpoint's prefill backlog (the
# "prefill" hash: "blocks|ms"), first draining what the endpoint computed since
# the last admission at its speed (a fluid queue: the backlog falls at the speed
# while it lasts). At an unknown speed the backlog is the request's blocks alone:
# nothing is known of what drained. Returns the admitted option's place, from 1.
ADMIT_OPTION_ARGS = 6
ADMIT = _NOW_MS + _WRITE_OPS + """
local replica, lease, model = ARGV[2], tonumber(ARGV[3]), ARGV[4]
local options = tonumber(ARGV[5])
local per_request, per_block = tonumber(ARGV[6]), tonumber(ARGV[7])
local margin, floor = tonumber(ARGV[8]), tonumber(ARGV[9])
local writes = 11 + options * """ + str(ADMIT_OPTION_ARGS) + """
local own = writes + tonumber(ARGV[10]) * """ + str(WRITE_ARGS) + """
apply(writes, own - 1)
local ik = prefix .. 'inflight:' .. replica
local fields = {}
for i = 1, options do
  local e = ARGV[11 + (i - 1) * """ + str(ADMIT_OPTION_ARGS) + """]
  fields[2 * i - 1], fields[2 * i] = e, e .. '|work'
end
local total = redis.call('HMGET', prefix .. 'inflight', unpack(fields))
local scores, best = {}, nil
for i = 1, options do
  local at = 11 + (i - 1) * """ + str(ADMIT_OPTION_ARGS) + """
  local seen, score = tonumber(ARGV[at + 2]), tonumber(ARGV[at + 4])
  if seen >= 0 then
    local requests, work = tonumber(total[2 * i - 1]) or 0, tonumber(total[2 * i]) or 0
    score = score - per_request * (requests - seen) - per_block * math.max(0, work - tonumber(ARGV[at + 3]))
  end
  scores[i] = score
  if best == nil or score > best then best = score end
end
if best < floor then return 0 end
passing()
local pick = 1
while scores[pick] < best - margin do pick = pick + 1 end
local at = 11 + (pick - 1) * """ + str(ADMIT_OPTION_ARGS) + """
local endpoint, work, speed = ARGV[at], tonumber(ARGV[at + 1]), tonumber(ARGV[at + 5])
count(prefix, ik, endpoint, 1)
if work > 0 then count(prefix, ik, endpoint .. '|work', work) end
if model ~= '' then count(prefix, ik, endpoint .. '@' .. model, 1) end
if work > 0 then
  local pk = prefix .. 'prefill'
  local backlog = 0
  if speed > 0 then
    local blocks, since = string.match(redis.call('HGET', pk, endpoint) or '', '^([^|]+)|(%d+)$')
    if blocks then backlog = math.max(0, tonumber(blocks) - speed * (now - tonumber(since)) / 1000) end
  end
  redis.call('HSET', pk, endpoint, string.format('%.1f|%d', backlog + work, now))
  redis.call('PEXPIRE', pk, lease * 10)
end
redis.call('PEXPIRE', ik, lease)
redis.call('PEXPIRE', prefix .. 'inflight', lease)
redis.call('ZADD', KEYS[1], now + lease, replica)
if pick == 1 then apply(own, #ARGV) end
return pick
"""

# One batch of an endpoint's KV-cache events in the endpoint's map (keys.kv_blocks),
# the engine's names for its blocks. `map_ops(key, from)` applies the operations in
# ARGV from `from` on, three arguments each:
# - "s", engine hash, "our key/bucket": the engine cached the block;
# - "r", engine hash, "": the engine reused the block's space;
# - "c", "", "": the engine's cache is empty (AllBlocksCleared, a restart, a resync).
# It returns the endpoint's blocks in the map.
_MAP_OPS = """
local function map_ops(key, from)
  for w = from, #ARGV, 3 do
    local op = ARGV[w]
    if op == 's' then
      redis.call('HSET', key, ARGV[w + 1], ARGV[w + 2])
    elseif op == 'r' then
      redis.call('HDEL', key, ARGV[w + 1])
    elseif op == 'c' then
      redis.call('DEL', key)
    else
      error('unknown operation ' .. op)
    end
  end
  return redis.call('HLEN', key)
end
"""

# On a cluster, the map's part of a batch (the blocks' holders are written before it,
# by WRITES "h" and "d" calls to their buckets, and the stream's status after it).
# KEYS[1] = the endpoint's map. ARGV = the operations (_MAP_OPS).
KV_MAP = _MAP_OPS + """
return map_ops(KEYS[1], 1)
"""

# On one Redis, a batch whole in one call: the blocks' holders, the map, the stream's
# status. KEYS[1] = the endpoint's map, KEYS[2] = the pool's stream statuses
# (keys.kv_streams). ARGV = pool prefix, endpoint, its encoded status, how many
# holder writes follow, the holder writes (_WRITE_OPS "h", "d"), then the map's
# operations (_MAP_OPS). Returns the endpoint's blocks in the map.
KV_APPLY = _NOW_MS + _WRITE_OPS + _MAP_OPS + """
local maps = 5 + tonumber(ARGV[4]) * """ + str(WRITE_ARGS) + """
apply(5, maps - 1)
local held = map_ops(KEYS[1], maps)
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return held
"""

# KEYS[1] = the old layout's map of an endpoint (keys.legacy_kv_blocks). ARGV = pool
# prefix, endpoint. Removes the endpoint from the old layout's holders of its
# blocks, and the map. Returns how many blocks it named.
LEGACY_DROP = """
local all = redis.call('HVALS', KEYS[1])
for _, ours in ipairs(all) do redis.call('HDEL', ARGV[1] .. 'pfx:' .. ours, ARGV[2]) end
redis.call('DEL', KEYS[1])
return #all
"""

# KEYS[1] = the endpoint's LRU. ARGV = batch size. Takes up to a batch of the blocks
# the endpoint was recorded to hold (its cache is gone: the server restarted), and
# returns them ("hash/bucket"): the caller removes the endpoint from their holders,
# and repeats until none are left without stalling Redis on a large LRU.
FORGET = """
local gone = redis.call('ZPOPMIN', KEYS[1], tonumber(ARGV[1]))
local out = {}
for j = 1, #gone, 2 do table.insert(out, gone[j]) end
return out
"""

# KEYS[1] = leader key, KEYS[2] = epoch counter. ARGV = candidate id, lease_ms.
# Acquires the lease when it is free (a new epoch) or renews it when the candidate
# holds it. Returns the holder's "id|epoch".
LEASE = """
local holder = redis.call('GET', KEYS[1])
if not holder then
  local epoch = redis.call('INCR', KEYS[2])
  holder = ARGV[1] .. '|' .. epoch
  redis.call('SET', KEYS[1], holder, 'PX', ARGV[2])
  return holder
end
if string.sub(holder, 1, #ARGV[1] + 1) == ARGV[1] .. '|' then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return holder
"""

# KEYS[1] = leader key, KEYS[2] = the key to write. ARGV = expected "id|epoch", value.
# Writes only while the writer still holds the lease of that epoch: a deposed
# leader, paused past its lease, cannot overwrite its successor.
FENCED_SET = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
return 1
"""

# KEYS[1] = members zset. ARGV = member id, lease_ms.
# Renews one member's lease, drops expired members, returns {now_ms, live members}:
# the caller keeps Redis's clock for its timestamps.
MEMBERSHIP = _NOW_MS + """
local lease = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return {now, redis.call('ZRANGE', KEYS[1], 0, -1)}
"""

# KEYS[1] = pickers zset. ARGV = pool prefix, replica, lease_ms, "1" to replace the
# replica's record ("" to keep it), then the replica's in-flight record as field,
# value pairs. The replica's own figures are the truth: this replaces its record
# whole (an admission or release cut off by a deadline or a cancelled request leaves
# nothing behind past the next heartbeat), renews its lease, drops the replicas whose
# lease ended with their records, and rebuilds the pool's total from the live records
# (a few small hashes, once a heartbeat, off the request path). A replica keeps its
# record while one of its admissions is under way: the figures it would send count
# that request where it was sent, and the admission may put it elsewhere or nowhere
# (picker/placement.py, `publish`). Returns 1.
PUBLISH = _NOW_MS + """
local prefix, replica, lease = ARGV[1], ARGV[2], tonumber(ARGV[3])
local own = prefix .. 'inflight:' .. replica
if ARGV[4] == '1' then
  redis.call('DEL', own)
  for i = 5, #ARGV, 2 do redis.call('HSET', own, ARGV[i], ARGV[i + 1]) end
end
redis.call('PEXPIRE', own, lease)
redis.call('ZADD', KEYS[1], now + lease, replica)
for _, r in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  redis.call('DEL', prefix .. 'inflight:' .. r)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local sum = {}
for _, r in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local kv = redis.call('HGETALL', prefix .. 'inflight:' .. r)
  for i = 1, #kv, 2 do sum[kv[i]] = (sum[kv[i]] or 0) + tonumber(kv[i + 1]) end
end
local total = prefix .. 'inflight'
redis.call('DEL', total)
for field, n in pairs(sum) do
  if n > 0 then redis.call('HSET', total, field, n) end
end
redis.call('PEXPIRE', total, lease)
return 1
"""

# Flow control's queue, one per pool, shared by every picker replica.
#
# Order: priority first; within a priority, round robin between tenants (deficit
# round robin with unit costs), FIFO within one. Each priority keeps a FIFO list
# per tenant and a sorted set of its tenants by turn; the tenant with the lowest
# turn goes next and its turn advances by one, a tenant that starts waiting joins
# at the turn last served plus one (no credit for its idle time), and equal turns
# go by tenant name. A ticket dropped at the head (expired, or its owner dead)
# costs its tenant no turn. Keys under the pool prefix:
#   queue            sorted set ticket -> sequence number: every waiting ticket
#   queue:tickets    hash ticket -> "owner|priority|deadline ms|enqueued ms|tenant"
#   queue:prios      sorted set priority -> -priority, the priorities with waiting tickets
#   queue:turns:P    sorted set tenant -> turn, the tenants waiting at priority P
#   queue:fifo:P:T   list of tenant T's waiting tickets at priority P
#   queue:served:P   the turn last served at priority P
#   queue:grants     sorted set ticket -> expiry of tickets let through, not yet admitted
_QUEUE_HELPERS = """
local function parse(meta)
  return string.match(meta or '', '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
end
local function tenant_done(prefix, priority, tenant)
  redis.call('ZREM', prefix .. 'queue:turns:' .. priority, tenant)
  if redis.call('ZCARD', prefix .. 'queue:turns:' .. priority) == 0 then
    redis.call('ZREM', prefix .. 'queue:prios', priority)
    redis.call('DEL', prefix .. 'queue:served:' .. priority)
  end
end
"""

# KEYS[1] = the pool's queue. ARGV = pool prefix, owner replica, priority, tenant,
# ttl_ms, most waiting at once. Returns the ticket, or false when the queue is full.
ENQUEUE = _NOW_MS + """
local prefix, priority, tenant = ARGV[1], ARGV[3], ARGV[4]
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[6]) then return false end
local seq = redis.call('INCR', prefix .. 'queue:seq')
local ticket = string.format('%015d', seq)
redis.call('ZADD', KEYS[1], seq, ticket)
redis.call('HSET', prefix .. 'queue:tickets', ticket,
           ARGV[2] .. '|' .. priority .. '|' .. (now + tonumber(ARGV[5])) .. '|' .. now .. '|' .. tenant)
redis.call('RPUSH', prefix .. 'queue:fifo:' .. priority .. ':' .. tenant, ticket)
local turns = prefix .. 'queue:turns:' .. priority
if not redis.call('ZSCORE', turns, tenant) then
  redis.call('ZADD', turns, tonumber(redis.call('GET', prefix .. 'queue:served:' .. priority) or 0) + 1, tenant)
end
redis.call('ZADD', prefix .. 'queue:prios', -tonumber(priority), priority)
return ticket
"""

# KEYS[1] = the pool's queue. ARGV = pool prefix, room (requests the caller's view
# says the pool can take now), grant_ms, the caller's replica id, the pool id, the
# reserve. Lets through up to room minus the grants still outstanding (granted, not
# yet admitted: their load is not in any view yet), in order; a request of priority
# 0 or less only while more than the reserve is free. A ticket past its deadline,
# or whose owner's lease has ended (the replica died), is dropped and the next one
# goes: nobody else loses a place. Each grant is published to its owner's channel
# (the caller learns its own from the reply). Returns {{owner, ticket, ...}, dropped}.
DISPATCH = _NOW_MS + _QUEUE_HELPERS + """
local prefix, queue = ARGV[1], KEYS[1]
local grants, tickets = prefix .. 'queue:grants', prefix .. 'queue:tickets'
for _, t in ipairs(redis.call('ZRANGEBYSCORE', grants, '-inf', now)) do redis.call('HDEL', tickets, t) end
redis.call('ZREMRANGEBYSCORE', grants, '-inf', now)
local free = tonumber(ARGV[2]) - redis.call('ZCARD', grants)
local out, dropped = {}, 0
while free > 0 do
  local top = redis.call('ZRANGE', prefix .. 'queue:prios', 0, 0)
  if #top == 0 then break end
  local priority = top[1]
  if tonumber(priority) <= 0 and free <= tonumber(ARGV[6]) then break end
  local turns = prefix .. 'queue:turns:' .. priority
  local head = redis.call('ZRANGE', turns, 0, 0, 'WITHSCORES')
  local tenant, turn = head[1], tonumber(head[2])
  local fifo = prefix .. 'queue:fifo:' .. priority .. ':' .. tenant
  local ticket = redis.call('LPOP', fifo)
  local owner, _, deadline = parse(ticket and redis.call('HGET', tickets, ticket))
  local lease = owner and redis.call('ZSCORE', prefix .. 'pickers', owner)
  local alive = owner and tonumber(deadline) > now and lease and tonumber(lease) > now
  if ticket then redis.call('ZREM', queue, ticket) end
  if alive then
    redis.call('SET', prefix .. 'queue:served:' .. priority, turn)
    turn = turn + 1
    redis.call('ZADD', grants, now + tonumber(ARGV[3]), ticket)
    if owner ~= ARGV[4] then redis.call('PUBLISH', 'gw:grants:' .. owner, ARGV[5] .. '\\n' .. ticket) end
    table.insert(out, owner)
    table.insert(out, ticket)
    free = free - 1
  else
    if ticket then redis.call('HDEL', tickets, ticket) end
    dropped = dropped + 1
  end
  if redis.call('LLEN', fifo) == 0 then
    tenant_done(prefix, priority, tenant)
  else
    redis.call('ZADD', turns, turn, tenant)
  end
end
return {out, dropped}
"""

# KEYS[1] = the pool's queue. ARGV = pool prefix, ticket. The request leaves: it was
# admitted after its grant, it timed out, or its client went away. Returns what it
# was: 'waiting', 'granted' (a grant raced its timeout: the caller may still go),
# or 'gone' (dropped, or the queue was lost).
LEAVE = _QUEUE_HELPERS + """
local prefix, queue, ticket = ARGV[1], KEYS[1], ARGV[2]
local tickets = prefix .. 'queue:tickets'
local waiting = redis.call('ZREM', queue, ticket)
local granted = redis.call('ZREM', prefix .. 'queue:grants', ticket)
local _, priority, _, _, tenant = parse(redis.call('HGET', tickets, ticket))
redis.call('HDEL', tickets, ticket)
if waiting == 1 then
  if priority then
    local fifo = prefix .. 'queue:fifo:' .. priority .. ':' .. tenant
    redis.call('LREM', fifo, 1, ticket)
    if redis.call('LLEN', fifo) == 0 then tenant_done(prefix, priority, tenant) end
  end
  return 'waiting'
end
if granted == 1 then return 'granted' end
return 'gone'
"""
