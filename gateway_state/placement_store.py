"""The picker's request path: the fleet's requests in flight, the prefill backlog and the prefix index."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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
    replicas: tuple[str, ...] = ()  # the live picker replicas of the pool, sorted
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


@dataclass(frozen=True)
class SpeculativeWrite:
    """In a pool indexed from engine events: `endpoint` is taken to hold the blocks for `ttl_ms`, until its
    engine's event confirms them (or the time passes)."""

    endpoint: str
    block_hashes: Sequence[str]
    ttl_ms: int


@dataclass(frozen=True)
class ReleaseWrite:
    """One of `replica`'s requests at `endpoint` ended (with its uncached prompt blocks and model)."""

    replica: str
    endpoint: str
    work_blocks: int = 0
    model: str = ""


Write = IndexWrite | SpeculativeWrite | ReleaseWrite  # what follows a decision, off the request path (scripts.WRITES)

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


def model_figures(figures: Mapping[str, int]) -> dict[str, int]:
    """An in-flight record's per-model fields (`model_field`), as they are."""
    return {name: n for name, n in figures.items() if n > 0 and MODEL_SEPARATOR in name}


def _pairs(flat: Sequence[bytes]) -> dict[str, int]:
    return {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}


def _write_args(writes: Sequence[Write]) -> list[str | int]:
    """The writes as the scripts take them, six arguments each (scripts._WRITE_OPS)."""
    args: list[str | int] = []
    for w in writes:
        if isinstance(w, IndexWrite):
            args += ["i", w.endpoint, w.prefix_ttl_ms, w.capacity_blocks, w.held_blocks, " ".join(w.block_hashes)]
        elif isinstance(w, SpeculativeWrite):
            args += ["s", w.endpoint, w.ttl_ms, "", "", " ".join(w.block_hashes)]
        else:
            args += ["r", w.replica, w.endpoint, w.work_blocks, w.model, ""]
    return args


def prefill_left(blocks: float, age_ms: int, blocks_per_s: float) -> float | None:
    """What remains of a prefill backlog of `blocks` recorded `age_ms` ago, at the endpoint's speed: a fluid
    queue drains at its speed while it lasts. None at an unknown speed (0). scripts.ADMIT does the same."""
    return max(0.0, blocks - blocks_per_s * age_ms / 1000) if blocks_per_s > 0 else None


class PlacementStore(RedisState):
    def __init__(self, redis: Redis | RedisCluster, link: ScriptLink | None = None) -> None:
        super().__init__(redis, link)
        self._lookup = link.script(scripts.LOOKUP) if link else redis.register_script(scripts.LOOKUP)
        self._admit = link.script(scripts.ADMIT) if link else redis.register_script(scripts.ADMIT)
        self._writes = link.script(scripts.WRITES) if link else redis.register_script(scripts.WRITES)
        self._forget = redis.register_script(scripts.FORGET)
        self._publish = redis.register_script(scripts.PUBLISH)

    async def lookup(self, pool: str, block_hashes: Sequence[str], leave_out: str = "",
                     speculative: bool = False) -> SharedView:
        """In-flight figures over the live replicas but `leave_out`, prefix holders, live replicas.
        `speculative`: the pool's index comes from engine events, and pickers' speculative entries count.

        Block hashes are hex digests: the scripts take them as one space-separated argument.
        """
        inflight, matched, replicas, backlog = await self._lookup(
            keys=[keys.pickers(pool)], args=[keys.pool_prefix(pool), leave_out, " ".join(block_hashes),
                                             "1" if speculative else ""])
        figures = _pairs(inflight)
        counts, work = split_figures(figures)
        return SharedView(counts, _pairs(matched), work, tuple(sorted(r.decode() for r in replicas)),
                          model_figures(figures),
                          {backlog[i].decode(): (float(backlog[i + 1]), int(backlog[i + 2]))
                           for i in range(0, len(backlog), 3)})

    async def admit(self, pool: str, replica: str, endpoint: str, lease_ms: int, work_blocks: int = 0,
                    others_seen: int = -1, model: str = "", prefill_blocks_per_s: float = 0.0,
                    before: Sequence[Write] = (), after: Sequence[Write] = ()) -> bool:
        """Count a request (and its `work_blocks` of uncached prompt, and one for its `model`) in flight at `endpoint`,
        and add its blocks to the endpoint's prefill backlog, drained at `prefill_blocks_per_s` (0: unknown).
        In the same round trip: the writes `before` (applied whatever happens), and `after` (only if admitted).

        False, with nothing of its own written, when `others_seen` (0 or more) is below the other
        replicas' requests there now: one of them chose the endpoint since the caller's lookup.
        """
        return bool(await self._admit(keys=[keys.pickers(pool)], args=[
            keys.pool_prefix(pool), replica, endpoint, lease_ms, work_blocks, others_seen, model,
            f"{prefill_blocks_per_s:.3f}", len(before), *_write_args(before), *_write_args(after)]))

    async def write(self, pool: str, writes: Sequence[Write]) -> int:
        """Apply `writes` in order in one round trip; returns how many prefix blocks the index writes evicted."""
        return int(await self._writes(keys=[keys.pickers(pool)], args=[keys.pool_prefix(pool), *_write_args(writes)]))

    async def index(self, pool: str, endpoint: str, block_hashes: Sequence[str], prefix_ttl_ms: int,
                    capacity_blocks: int, held_blocks: int = 0) -> int:
        """Note that `endpoint` now holds the prompt's blocks; returns how many its LRU evicted."""
        return await self.write(pool, [IndexWrite(endpoint, block_hashes, prefix_ttl_ms, capacity_blocks,
                                                  held_blocks)])

    async def release(self, pool: str, replica: str, endpoint: str, work_blocks: int = 0, model: str = "") -> None:
        await self.write(pool, [ReleaseWrite(replica, endpoint, work_blocks, model)])

    async def publish(self, pool: str, replica: str, lease_ms: int, figures: Mapping[str, int]) -> None:
        """Replace the replica's in-flight record with its own figures and renew its lease (its heartbeat)."""
        pairs = [x for name, n in figures.items() if n > 0 for x in (name, n)]
        await self._publish(keys=[keys.pickers(pool)], args=[keys.pool_prefix(pool), replica, lease_ms, *pairs])

    async def forget_endpoint(self, pool: str, endpoint: str, batch: int = 1000) -> None:
        """Drop the endpoint from the prefix index: its KV cache is gone."""
        lru, prefix = keys.endpoint_lru(pool, endpoint), keys.pool_prefix(pool)
        while int(await self._forget(keys=[lru], args=[prefix, endpoint, batch])):
            pass

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
