"""Every Redis key the fleet uses.

Keys that belong to one pool carry the pool name as a Redis Cluster hash tag
(`{pool}`), so the multi-key Lua scripts of one pool run on one shard: the
in-flight records, admission, the prefill backlog, flow control's queue, the
load samples. The prefix index, the bulk of a pool's work, is spread over more
tags: a block's holders (`pfx:`, `spec:`) live under a tag of the pool and one of
INDEX_BUCKETS buckets, the bucket a hash of the prompt's first block (so one
prompt's blocks, and its lookup, are on one shard, and different prompts on
different ones); an endpoint's own records of what it holds (its LRU, the
engine's block names) under a tag of the pool and the endpoint. The scripts
derive the bucket and endpoint prefixes from the pool prefix they are given
(scripts._INDEX_PREFIXES), in the same format as here.
"""

from __future__ import annotations

import hashlib
import zlib

# The whole routing configuration (pools, endpoints, models) is one record, so a
# reader always sees one consistent generation of it.
CONFIG = "gw:{config}:config"


# The controller leader's lease, "id|epoch", and the epoch counter that fences writes.
# Same hash tag as CONFIG: a fenced write checks the lease and sets the config atomically.
LEADER = "gw:{config}:leader"
LEADER_EPOCH = "gw:{config}:epoch"

# Sorted set collector id -> lease expiry (ms): the collectors sharing the scrape work.
COLLECTORS = "gw:{collectors}:members"


def pool_prefix(pool: str) -> str:
    """Prefix of every per-pool key; Lua scripts derive their keys from it."""
    return f"gw:{{{pool}}}:"


def load(pool: str) -> str:
    """Hash endpoint -> encoded LoadSample, written by collectors."""
    return pool_prefix(pool) + "load"


def pickers(pool: str) -> str:
    """Sorted set picker replica id -> lease expiry (ms) of its in-flight counts."""
    return pool_prefix(pool) + "pickers"


def inflight(pool: str, replica: str) -> str:
    """Hash endpoint -> requests this picker replica has in flight there."""
    return pool_prefix(pool) + "inflight:" + replica


def inflight_total(pool: str) -> str:
    """Hash endpoint -> requests in flight there over all the live picker replicas: the sum of their
    records (`inflight`), kept beside them by every admission and release and rebuilt from them on every
    heartbeat, so a decision reads one record however many replicas there are."""
    return pool_prefix(pool) + "inflight"


def prefill_backlog(pool: str) -> str:
    """Hash endpoint -> "blocks|ms": the uncached prompt blocks the endpoint had still to compute at
    that time (Redis's clock), by the fleet's admissions and the endpoint's measured speed."""
    return pool_prefix(pool) + "prefill"


# How many buckets one pool's prefix index is spread over. Sixteen tags land on every shard of a cluster
# of up to a few shards, and a shard's share of them evens out as shards are added.
INDEX_BUCKETS = 16


def index_bucket(first_block: str) -> int:
    """The bucket of a prompt's index entries: a hash of its first block's hash."""
    return zlib.crc32(first_block.encode()) % INDEX_BUCKETS


def bucket_prefix(pool: str, bucket: int) -> str:
    """Prefix of one bucket's keys of the pool's prefix index."""
    return f"gw:{{{pool}|b{bucket}}}:"


def endpoint_tag(endpoint: str) -> str:
    """What stands for an endpoint in its records' hash tag: the first 8 hex digits of its name's SHA-1.
    A slot is a CRC16 of the tag, and CRC is linear: names that differ in a digit or two (the addresses
    of one subnet, at one port) would take slots a fixed pattern apart, so a pool's endpoints would crowd
    one shard (all four of examples/fleet did). The scripts derive the same (scripts._INDEX_PREFIXES)."""
    return hashlib.sha1(endpoint.encode()).hexdigest()[:8]


def endpoint_prefix(pool: str, endpoint: str) -> str:
    """Prefix of one endpoint's own index records."""
    return f"gw:{{{pool}|e|{endpoint_tag(endpoint)}}}:{endpoint}:"


def earlier_endpoint_prefix(pool: str, endpoint: str) -> str:
    """Where `endpoint_prefix` was before its tag was a hash of the endpoint's name. The LRU there expires
    (it is written with the prefix lifetime); the engine's block names there are dropped, and the
    endpoint's entries rebuilt, by the collector that picks up its stream (KvIndexStore.drop_legacy)."""
    return f"gw:{{{pool}|e|{endpoint}}}:"


def prefix_block(pool: str, bucket: int, block_hash: str) -> str:
    """Hash endpoint -> last use (ms) for one chained prefix block (block_keys); in a pool whose index
    comes from engine events, the endpoints whose engine reported the block cached."""
    return bucket_prefix(pool, bucket) + "pfx:" + block_hash


def speculative_block(pool: str, bucket: int, block_hash: str) -> str:
    """Hash endpoint -> until when (ms) a picker's placement there stands for the block, in a pool whose
    index comes from engine events, until the engine's own event confirms it (or the time passes)."""
    return bucket_prefix(pool, bucket) + "spec:" + block_hash


def kv_blocks(pool: str, endpoint: str) -> str:
    """Hash engine block hash -> "our block key/bucket", for the blocks the endpoint's engine reported
    cached (its events name parents and removals by the engine's hash)."""
    return endpoint_prefix(pool, endpoint) + "kvmap"


def legacy_kv_blocks(pool: str, endpoint: str) -> str:
    """Where `kv_blocks` was before the index was spread over buckets (its entries' holders were
    `pool_prefix(pool) + "pfx:" + key`): a collector that finds it removes both and rebuilds the
    endpoint's entries (KvIndexStore.drop_legacy). Kept for upgrades from that layout."""
    return pool_prefix(pool) + "kvmap:" + endpoint


def kv_streams(pool: str) -> str:
    """Hash endpoint -> encoded KvStreamStatus: each endpoint's KV-event stream, as its collector sees it."""
    return pool_prefix(pool) + "kvstreams"


def endpoint_lru(pool: str, endpoint: str) -> str:
    """Sorted set of the prefix blocks recorded for one endpoint, by recency, each as "hash/bucket"."""
    return endpoint_prefix(pool, endpoint) + "lru"


def bypass(pool: str) -> str:
    """Hash gateway instance -> encoded BypassSample: what the gateway did with the pool's requests over
    the collector's trailing window (how many it served without a picker's decision)."""
    return pool_prefix(pool) + "bypass"


def drained(pool: str) -> str:
    """Hash endpoint -> when an operator drained it (ms): pickers send it no new requests."""
    return pool_prefix(pool) + "drained"


def hit_counts(pool: str, minute: int) -> str:
    """Hash `model|queried` / `model|matched` -> prefix blocks, summed over the pickers for one minute."""
    return pool_prefix(pool) + f"hits:{minute}"


def queue(pool: str) -> str:
    """Sorted set ticket -> sequence number of every request waiting for room (flow control); the
    order they go in is kept beside it, under the same prefix (see scripts.ENQUEUE)."""
    return pool_prefix(pool) + "queue"


def queue_tickets(pool: str) -> str:
    """Hash ticket -> "owner|priority|deadline ms|enqueued ms|tenant" of every waiting or granted request."""
    return pool_prefix(pool) + "queue:tickets"


def queue_grants(pool: str) -> str:
    """Sorted set ticket -> grant expiry (ms): requests let through whose owner has not admitted them yet."""
    return pool_prefix(pool) + "queue:grants"


def grants_channel(replica: str) -> str:
    """Pub/sub channel on which a picker replica hears that one of its waiting requests may go."""
    return "gw:grants:" + replica
