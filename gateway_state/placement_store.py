"""The picker's request path: the fleet's requests in flight, the prefill backlog and the prefix index."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

from redis.asyncio import Redis, RedisCluster

from gateway_state import keys, scripts
from gateway_state.redis_state import RedisState
from gateway_state.script_link import ScriptLink


@dataclass(frozen=True)
class SharedView:
    """What the picker reads from Redis for one decision."""

    inflight: dict[str, int]  # endpoint -> requests in flight, over all picker replicas
    matched_blocks: dict[str, int]  # endpoint -> leading prompt blocks it holds
    inflight_work: dict[str, int] = field(default_factory=dict)  # endpoint -> uncached prompt blocks in flight
    # model_field(endpoint, model) -> requests for that model (a LoRA adapter, say) in flight there
    inflight_models: dict[str, int] = field(default_factory=dict)
    # endpoint -> (uncached prompt blocks it had still to compute, how long ago in ms) at the last
    # admission there (keys.prefill_backlog); the reader drains it at the endpoint's speed since
    prefill_backlog: dict[str, tuple[float, int]] = field(default_factory=dict)
    # endpoint -> uncached prompt blocks the reader itself admitted there after the lookup was sent,
    # which `prefill_backlog` does not hold yet
    unrecorded_work: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class IndexWrite:
    """`endpoint` now holds the prompt's blocks, in an LRU of `capacity_blocks`; it held the first
    `held_blocks` at the decision (the lookup's match), so only the rest may need writing."""

    endpoint: str
    block_hashes: Sequence[str]
    prefix_ttl_ms: int
    capacity_blocks: int
    held_blocks: int = 0

    @property
    def bucket(self) -> int:
        return keys.index_bucket(self.block_hashes[0]) if self.block_hashes else 0


@dataclass(frozen=True)
class SpeculativeWrite:
    """In a pool indexed from engine events: `endpoint` is taken to hold the blocks for `ttl_ms`, until its
    engine's event confirms them (or the time passes). `bucket`: the prompt's (keys.index_bucket of its
    first block; the blocks here may be a later part of it)."""

    endpoint: str
    block_hashes: Sequence[str]
    ttl_ms: int
    bucket: int = 0


@dataclass(frozen=True)
class ReleaseWrite:
    """One of `replica`'s requests at `endpoint` ended (with its uncached prompt blocks and model)."""

    replica: str
    endpoint: str
    work_blocks: int = 0
    model: str = ""


Write = IndexWrite | SpeculativeWrite | ReleaseWrite  # what follows a decision, off the request path (scripts.WRITES)


@dataclass(frozen=True)
class Option:
    """An endpoint an admission may take, as the decision saw it."""

    endpoint: str
    work_blocks: int = 0  # the prompt's uncached blocks there
    seen: int = -1  # the pool's requests there in the decision's view, this replica's own included; -1 unknown
    seen_work: int = 0  # and their uncached prompt blocks
    score: float = 0.0  # its total in the decision
    blocks_per_s: float = 0.0  # its prefill speed in blocks per second; 0 unknown


@dataclass(frozen=True)
class Weighing:
    """How an admission re-weighs its options on the pool's figures of that instant (scripts.ADMIT):
    the first within `margin` of the best is admitted, none if the best fell below `floor`. The default is
    the plain check of one option: refused when the pool's requests there passed what the decision saw."""

    per_request: float = 1.0
    per_block: float = 0.0
    margin: float = 0.0
    floor: float = 0.0


PLAIN_CHECK = Weighing()
NEVER_REFUSED = -1e9  # a floor no re-weighed score falls below


def weigh(options: Sequence[Option], weighing: Weighing, requests: Mapping[str, int],
          work: Mapping[str, int]) -> int:
    """scripts.ADMIT's choice among `options` given the pool's `requests` and uncached `work` per
    endpoint now: the admitted option's place from 1, or 0 for none."""
    scores = [o.score if o.seen < 0 else o.score - weighing.per_request * (requests.get(o.endpoint, 0) - o.seen)
              - weighing.per_block * max(0, work.get(o.endpoint, 0) - o.seen_work) for o in options]
    best = max(scores)
    if best < weighing.floor:
        return 0
    return next(i for i, score in enumerate(scores, start=1) if score >= best - weighing.margin)

WORK_SUFFIX = "|work"  # in-flight hash field of an endpoint's uncached prompt blocks
MODEL_SEPARATOR = "@"  # in-flight hash field "endpoint@model": the requests for that model there


def model_field(endpoint: str, model: str) -> str:
    return f"{endpoint}{MODEL_SEPARATOR}{model}"


def split_figures(figures: Mapping[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """An in-flight record's fields into (requests, uncached prompt blocks) per endpoint."""
    requests, work = {}, {}
    for name, n in figures.items():
        if n <= 0 or MODEL_SEPARATOR in name:
            continue
        if name.endswith(WORK_SUFFIX):
            work[name.removesuffix(WORK_SUFFIX)] = n
        else:
            requests[name] = n
    return requests, work


def summed(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    """Two sets of figures added per name, the positive sums only (what adding two Counters gives)."""
    out = dict(a)
    for name, n in b.items():
        out[name] = out.get(name, 0) + n
    return {name: n for name, n in out.items() if n > 0}


def model_figures(figures: Mapping[str, int]) -> dict[str, int]:
    """An in-flight record's per-model fields (`model_field`), as they are."""
    return {name: n for name, n in figures.items() if n > 0 and MODEL_SEPARATOR in name}


def _pairs(flat: Sequence[bytes]) -> dict[str, int]:
    return {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}


def hash_list(block_hashes: Sequence[str]) -> str:
    """Block hashes as the scripts take them in one argument (scripts `hash_list`): "W:" and the hashes one
    after the other when all have the width W (the picker's do: 16 hex digits), so a script reads only those
    it needs; else joined by spaces."""
    width = len(block_hashes[0]) if block_hashes else 0
    if width and all(len(h) == width for h in block_hashes):
        return f"{width}:" + "".join(block_hashes)
    return " ".join(block_hashes)


def _write_args(writes: Sequence[Write], lru_only: bool = False) -> list[str | int]:
    """The writes as the scripts take them (scripts._WRITE_OPS); `lru_only`: an index write's LRU half."""
    args: list[str | int] = []
    for w in writes:
        if isinstance(w, IndexWrite):
            args += ["l" if lru_only else "i", w.endpoint, w.prefix_ttl_ms, w.capacity_blocks, w.held_blocks,
                     w.bucket, hash_list(w.block_hashes)]
        elif isinstance(w, SpeculativeWrite):
            args += ["s", w.endpoint, w.ttl_ms, "", "", w.bucket, " ".join(w.block_hashes)]
        else:
            args += ["r", w.replica, w.endpoint, w.work_blocks, w.model, "", ""]
    return args


# The most blocks one holder write names (a clear of a large cache goes in several).
MAX_HOLDER_RUN = 256


def holder_writes(endpoint: str, changes: Iterable[tuple[int | str, int | None, str]]) -> dict[str, list[str | int]]:
    """Per bucket, the writes (scripts._WRITE_OPS "h", "d") of changes to the holders of blocks, in order: each
    change is (bucket, ttl_ms, block): `endpoint` holds the block for ttl_ms (0: for ever), or not (None).
    Runs of one kind are merged into one write."""
    runs: dict[str, list[tuple[int | None, list[str]]]] = defaultdict(list)
    for bucket, ttl_ms, block in changes:
        run = runs[str(bucket)]
        if run and run[-1][0] == ttl_ms and len(run[-1][1]) < MAX_HOLDER_RUN:
            run[-1][1].append(block)
        else:
            run.append((ttl_ms, [block]))
    out: dict[str, list[str | int]] = {}
    for b, run in runs.items():
        args: list[str | int] = []
        for ttl, blocks in run:
            args += ["d", endpoint, "", "", "", b] if ttl is None else ["h", endpoint, ttl, "", "", b]
            args.append(" ".join(blocks))
        out[b] = args
    return out


def split_member(member: bytes | str) -> tuple[str, str]:
    """An LRU member "hash/bucket" into (hash, bucket)."""
    text = member.decode() if isinstance(member, bytes) else member
    block, _, bucket = text.rpartition("/")
    return block, bucket


def prefill_left(blocks: float, age_ms: int, blocks_per_s: float) -> float | None:
    """What remains of a prefill backlog of `blocks` recorded `age_ms` ago, at the endpoint's speed: a fluid
    queue drains at its speed while it lasts. None at an unknown speed (0). scripts.ADMIT does the same."""
    return max(0.0, blocks - blocks_per_s * age_ms / 1000) if blocks_per_s > 0 else None


class PlacementStore(RedisState):
    """On one Redis, a lookup is one call and an admission carries its decision's index write. On a Redis
    Cluster the pool's keys and its index's are on different shards (keys): a lookup is two calls at once
    (the pool's load, the prompt's bucket), and an index write goes in two steps off the request path (the
    endpoint's LRU, then the holders in the buckets), so `index_rides_admission` is False there."""

    def __init__(self, redis: Redis | RedisCluster, link: ScriptLink | None = None) -> None:
        super().__init__(redis, link)
        self.index_rides_admission = not isinstance(redis, RedisCluster)
        self._lookup = link.script(scripts.LOOKUP) if link else redis.register_script(scripts.LOOKUP)
        self._admit = link.script(scripts.ADMIT) if link else redis.register_script(scripts.ADMIT)
        self._writes = link.script(scripts.WRITES) if link else redis.register_script(scripts.WRITES)
        self._forget = redis.register_script(scripts.FORGET)
        self._publish = link.script(scripts.PUBLISH) if link else redis.register_script(scripts.PUBLISH)

    async def lookup(self, pool: str, block_hashes: Sequence[str], leave_out: str = "",
                     speculative: bool = False, releases: Sequence[ReleaseWrite] = ()) -> SharedView:
        """In-flight figures over the live replicas but `leave_out`, and the prompt's prefix holders.
        `speculative`: the pool's index comes from engine events, and pickers' speculative entries count.
        `releases` are applied first, in the same round trip (on a cluster, the pool's part).

        Block hashes are hex digests: the scripts take them in one argument (`hash_list`).
        """
        prefix, bucket = keys.pool_prefix(pool), keys.index_bucket(block_hashes[0]) if block_hashes else 0
        args = [prefix, leave_out, hash_list(block_hashes), "1" if speculative else "", bucket]
        carried = _write_args(releases)
        if self.index_rides_admission or not block_hashes:
            inflight, matched, backlog = await self._lookup(keys=[keys.pickers(pool)], args=[*args, "", *carried])
        else:  # the load part reads no block hashes, so it is sent none
            (inflight, _, backlog), (_, matched, _) = await asyncio.gather(
                self._lookup(keys=[keys.pickers(pool)], args=[prefix, leave_out, "", "", 0, "load", *carried]),
                self._lookup(keys=[keys.prefix_block(pool, bucket, block_hashes[0])], args=[*args, "index"]))
        figures = _pairs(inflight)
        counts, work = split_figures(figures)
        return SharedView(counts, _pairs(matched), work, model_figures(figures),
                          {backlog[i].decode(): (float(backlog[i + 1]), int(backlog[i + 2]))
                           for i in range(0, len(backlog), 3)})

    def admit(self, pool: str, replica: str, options: Sequence[Option], lease_ms: int, model: str = "",
              weighing: Weighing = PLAIN_CHECK, before: Sequence[Write] = (),
              after: Sequence[Write] = ()) -> Awaitable[int]:
        """Count a request (and its uncached prompt blocks, and one for its `model`) in flight at one of the
        `options`, as `weighing` picks it on the figures there now (scripts.ADMIT), and add its blocks to that
        endpoint's prefill backlog, drained at the option's speed. The writes `before` are applied whatever
        happens, and `after` (written for the first option) only if the first option is admitted: in the same
        round trip, but for a cluster's index writes (sent beside it, or after it).

        Returns the admitted option's place, from 1; 0, with nothing of its own written, when none was. On one
        Redis reached through the script link, the call is sent at once and its reply is a future (a caller
        that keeps waiting for a late answer needs no task of its own).
        """
        head: list[str | int] = [keys.pool_prefix(pool), replica, lease_ms, model, len(options),
                                 repr(weighing.per_request), repr(weighing.per_block), repr(weighing.margin),
                                 repr(weighing.floor)]
        opts: list[str | int] = []
        for o in options:
            opts += [o.endpoint, o.work_blocks, o.seen, o.seen_work, repr(o.score), f"{o.blocks_per_s:.3f}"]
        if self.index_rides_admission:  # the reply is an integer
            return cast(Awaitable[int], self._admit(keys=[keys.pickers(pool)], args=[
                *head, len(before), *opts, *_write_args(before), *_write_args(after)]))
        return self._admit_apart(pool, head, opts, before, after)

    async def _admit_apart(self, pool: str, head: list[str | int], opts: list[str | int], before: Sequence[Write],
                           after: Sequence[Write]) -> int:
        """The admission on a Redis Cluster: its index writes on their own shards, beside it or after it."""
        releases = [w for w in before if isinstance(w, ReleaseWrite)]
        indexed = [w for w in before if not isinstance(w, ReleaseWrite)]
        admit = self._admit(keys=[keys.pickers(pool)], args=[*head, len(releases), *opts, *_write_args(releases)])
        admitted = int((await asyncio.gather(admit, self.write(pool, indexed)))[0] if indexed else await admit)
        if admitted == 1 and after:
            await self.write(pool, after)
        return admitted

    async def write(self, pool: str, writes: Sequence[Write]) -> int:
        """Apply `writes` (in order on one Redis; on a cluster, each slot's in order); returns how many prefix
        blocks the index writes evicted."""
        if not writes:
            return 0
        prefix = keys.pool_prefix(pool)
        if self.index_rides_admission:
            return int((await self._writes(keys=[keys.pickers(pool)], args=[prefix, *_write_args(writes)]))[0])
        releases = [w for w in writes if isinstance(w, ReleaseWrite)]
        speculative = [w for w in writes if isinstance(w, SpeculativeWrite)]
        indexed = [w for w in writes if isinstance(w, IndexWrite)]
        calls = [self._writes(keys=[keys.pickers(pool)], args=[prefix, *_write_args(releases)])] if releases else []
        for sw in speculative:
            calls.append(self._writes(keys=[keys.bucket_prefix(pool, sw.bucket)], args=[prefix, *_write_args([sw])]))
        by_endpoint: dict[str, list[IndexWrite]] = defaultdict(list)
        for iw in indexed:
            by_endpoint[iw.endpoint].append(iw)
        lru_calls = [self._writes(keys=[keys.endpoint_lru(pool, e)], args=[prefix, *_write_args(ws, lru_only=True)])
                     for e, ws in by_endpoint.items()]
        replies = await asyncio.gather(*lru_calls, *calls)
        # The holders of what each endpoint's LRU took and let go, one call per bucket.
        evicted = 0
        holders: dict[str, list[str | int]] = defaultdict(list)
        for (endpoint, ws), (n, results) in zip(by_endpoint.items(), replies, strict=False):
            evicted += int(n)
            changes: list[tuple[int | str, int | None, str]] = []
            for w, (first, *gone) in zip(ws, results, strict=True):
                changes += [(w.bucket, w.prefix_ttl_ms, h) for h in w.block_hashes[int(first) - 1:]]
                changes += [(bucket, None, block) for block, bucket in map(split_member, gone)]
            for bucket, args in holder_writes(endpoint, changes).items():
                holders[bucket] += args
        await self.write_holders(pool, holders)
        return evicted

    async def write_holders(self, pool: str, by_bucket_args: Mapping[str, Sequence[str | int]]) -> None:
        """Holder writes (`holder_writes`) per bucket, one call to each bucket's slot, at once."""
        prefix = keys.pool_prefix(pool)
        await asyncio.gather(*(self._writes(keys=[keys.bucket_prefix(pool, int(b))], args=[prefix, *args])
                               for b, args in by_bucket_args.items() if args))

    async def index(self, pool: str, endpoint: str, block_hashes: Sequence[str], prefix_ttl_ms: int,
                    capacity_blocks: int, held_blocks: int = 0) -> int:
        """Note that `endpoint` now holds the prompt's blocks; returns how many its LRU evicted."""
        return await self.write(pool, [IndexWrite(endpoint, block_hashes, prefix_ttl_ms, capacity_blocks,
                                                  held_blocks)])

    async def release(self, pool: str, replica: str, endpoint: str, work_blocks: int = 0, model: str = "") -> None:
        await self.write(pool, [ReleaseWrite(replica, endpoint, work_blocks, model)])

    async def publish(self, pool: str, replica: str, lease_ms: int, figures: Mapping[str, int] | None) -> None:
        """Replace the replica's in-flight record with its own figures (None: keep it) and renew its lease (its
        heartbeat). Through the script link, the call is sent before this coroutine first waits, behind every
        call sent before it."""
        pairs = [x for name, n in (figures or {}).items() if n > 0 for x in (name, n)]
        await self._publish(keys=[keys.pickers(pool)], args=[keys.pool_prefix(pool), replica, lease_ms,
                                                             "" if figures is None else "1", *pairs])

    async def forget_endpoint(self, pool: str, endpoint: str, batch: int = 1000) -> None:
        """Drop the endpoint from the prefix index: its KV cache is gone. Its LRU of the layout before hashed
        endpoint tags (keys.earlier_endpoint_prefix) goes too, until that expires after an upgrade."""
        for lru in (keys.endpoint_lru(pool, endpoint), keys.earlier_endpoint_prefix(pool, endpoint) + "lru"):
            while gone := await self._forget(keys=[lru], args=[batch]):
                await self.write_holders(pool, holder_writes(endpoint, ((bucket, None, block)
                                                                        for block, bucket in map(split_member, gone))))

    async def inflight_by_replica(self, pool: str, replicas: Sequence[str]) -> dict[str, dict[str, int]]:
        """replica -> endpoint -> requests it has in flight there (its last published figures)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for replica in replicas:
                pipe.hgetall(keys.inflight(pool, replica))
            replies = await pipe.execute()
        return {replica: split_figures({k.decode(): int(v) for k, v in reply.items()})[0]
                for replica, reply in zip(replicas, replies, strict=True)}

    async def prefix_blocks_held(self, pool: str, endpoints: Sequence[str]) -> dict[str, int]:
        """endpoint -> prefix blocks its LRU holds."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for endpoint in endpoints:
                pipe.zcard(keys.endpoint_lru(pool, endpoint))
            return dict(zip(endpoints, (int(n) for n in await pipe.execute()), strict=True))
