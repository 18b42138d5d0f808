"""The typed face of Redis: every read and write the fleet makes goes through here."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

from redis.asyncio import Redis, RedisCluster

from gateway_state import keys, scripts
from gateway_state.records import (
    BypassSample,
    Config,
    LoadSample,
    decode_bypass,
    decode_config,
    decode_load,
    encode_bypass,
    encode_config,
    encode_load,
)
from gateway_state.script_link import ScriptLink


class Deposed(Exception):
    """A write fenced off: the writer's leader lease has passed to another controller."""


@dataclass(frozen=True)
class SnapshotReply:
    """What a picker refreshes from Redis in one round trip."""

    config: bytes | None  # encoded; None when Redis holds none
    load: dict[str, dict[str, LoadSample]]  # pool -> endpoint -> sample
    drained: dict[str, frozenset[str]]  # pool -> endpoints an operator drained
    queued: dict[str, int] = field(default_factory=dict)  # pool -> requests waiting in its queue


@dataclass(frozen=True)
class FleetView:
    collectors: dict[str, int]  # collector -> lease expiry (ms, Redis's clock)
    leader: str | None  # the controller leader's "id|epoch"
    pickers: dict[str, dict[str, int]]  # pool -> picker replica -> lease expiry (ms)


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


@dataclass(frozen=True)
class IndexWrite:
    """`endpoint` now holds the prompt's blocks, in an LRU of `capacity_blocks`."""

    endpoint: str
    block_hashes: Sequence[str]
    prefix_ttl_ms: int
    capacity_blocks: int


@dataclass(frozen=True)
class ReleaseWrite:
    """One of `replica`'s requests at `endpoint` ended (with its uncached prompt blocks and model)."""

    replica: str
    endpoint: str
    work_blocks: int = 0
    model: str = ""


Write = IndexWrite | ReleaseWrite  # what follows a decision, off the request path (scripts.WRITES)

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


def prefill_left(blocks: float, age_ms: int, blocks_per_s: float) -> float | None:
    """What remains of a prefill backlog of `blocks` recorded `age_ms` ago, at the endpoint's speed: a fluid
    queue drains at its speed while it lasts. None at an unknown speed (0). scripts.ADMIT does the same."""
    return max(0.0, blocks - blocks_per_s * age_ms / 1000) if blocks_per_s > 0 else None


def redis_time_ms(reply: tuple[int, int]) -> int:
    """TIME's (seconds, microseconds) as milliseconds."""
    return int(reply[0]) * 1000 + int(reply[1]) // 1000


class StateStore:
    def __init__(self, redis: Redis | RedisCluster, link: ScriptLink | None = None) -> None:
        """`link`: the lean connection the picker's request-path scripts (lookup, admit, the writes after)
        take instead of redis-py, to the same Redis (see script_link)."""
        self.redis = redis
        self.link = link
        # register_script does no I/O; scripts load on first use (EVALSHA, then EVAL).
        self._lookup = link.script(scripts.LOOKUP) if link else redis.register_script(scripts.LOOKUP)
        self._admit = link.script(scripts.ADMIT) if link else redis.register_script(scripts.ADMIT)
        self._writes = link.script(scripts.WRITES) if link else redis.register_script(scripts.WRITES)
        self._forget = redis.register_script(scripts.FORGET)
        self._publish = redis.register_script(scripts.PUBLISH)
        self._membership = redis.register_script(scripts.MEMBERSHIP)
        self._lease = redis.register_script(scripts.LEASE)
        self._fenced_set = redis.register_script(scripts.FENCED_SET)
        self._enqueue = redis.register_script(scripts.ENQUEUE)
        self._dispatch = redis.register_script(scripts.DISPATCH)
        self._leave = redis.register_script(scripts.LEAVE)

    # -- configuration (controller writes, everyone reads) -------------------

    async def write_config(self, config: Config, leadership: str) -> None:
        """Write the config as the leader `leadership` ("id|epoch"); raises Deposed otherwise."""
        written = await self._fenced_set(keys=[keys.LEADER, keys.CONFIG], args=[leadership, encode_config(config)])
        if not written:
            raise Deposed(f"{leadership} no longer holds the controller lease")

    async def lead(self, candidate: str, lease_ms: int) -> str:
        """Acquire or renew the controller lease; returns the holder as "id|epoch"."""
        holder: bytes = await self._lease(keys=[keys.LEADER, keys.LEADER_EPOCH], args=[candidate, lease_ms])
        return holder.decode()

    async def read_config(self) -> Config | None:
        """The config, or None when Redis holds none (lost, or not yet written)."""
        raw: bytes | None = await self.redis.get(keys.CONFIG)  # type: ignore[assignment]  # never decoded to str
        return decode_config(raw) if raw is not None else None

    # -- load samples (collectors write, pickers read) ------------------------

    async def write_load(self, pool: str, samples: Mapping[str, LoadSample]) -> None:
        if samples:
            await self.redis.hset(keys.load(pool), mapping={e: encode_load(s) for e, s in samples.items()})

    async def write_bypass(self, samples: Mapping[str, Mapping[str, BypassSample]], keep_ms: int) -> None:
        """pool -> gateway instance -> its sample; a pool no gateway reports on any more expires after `keep_ms`."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for pool, by_gateway in samples.items():
                pipe.hset(keys.bypass(pool), mapping={g: encode_bypass(s) for g, s in by_gateway.items()})
                pipe.pexpire(keys.bypass(pool), keep_ms)
            await pipe.execute()

    async def read_bypass(self, pools: Sequence[str]) -> dict[str, dict[str, BypassSample]]:
        """pool -> gateway instance -> the last sample its collector wrote (judge its age by `at_ms`)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for pool in pools:
                pipe.hgetall(keys.bypass(pool))
            replies = await pipe.execute()
        return {pool: {g.decode(): decode_bypass(v) for g, v in reply.items()}
                for pool, reply in zip(pools, replies, strict=True) if reply}

    async def read_snapshot(self, pools: Sequence[str]) -> SnapshotReply:
        """The encoded config and the load samples of `pools`, in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(keys.CONFIG)
            for pool in pools:
                pipe.hgetall(keys.load(pool))
                pipe.hkeys(keys.drained(pool))
                pipe.zcard(keys.queue(pool))
            raw, *replies = await pipe.execute()
        loads, drains, queued = replies[0::3], replies[1::3], replies[2::3]
        return SnapshotReply(raw, {
            pool: {e.decode(): decode_load(v) for e, v in reply.items()}
            for pool, reply in zip(pools, loads, strict=True)
        }, {pool: frozenset(e.decode() for e in reply) for pool, reply in zip(pools, drains, strict=True) if reply},
            {pool: int(n) for pool, n in zip(pools, queued, strict=True) if n})

    async def set_drained(self, pool: str, endpoint: str, draining: bool) -> None:
        """Drain an endpoint (pickers send it no new requests), or undo it."""
        if draining:
            await self.redis.hset(keys.drained(pool), endpoint, await self.now_ms())
        else:
            await self.redis.hdel(keys.drained(pool), endpoint)

    async def prune_load(self, pool: str, keep: set[str]) -> None:
        """Drop samples of endpoints that left the pool."""
        fields: list[bytes] = await self.redis.hkeys(keys.load(pool))  # type: ignore[assignment]  # bytes, as above
        stale = [e for e in fields if e.decode() not in keep]
        if stale:
            await self.redis.hdel(keys.load(pool), *stale)

    async def now_ms(self) -> int:
        """Redis's clock (a Redis Cluster answers from one of its nodes)."""
        reply = await self.redis.time()
        if isinstance(reply, dict):
            reply = next(iter(reply.values()))
        return redis_time_ms(reply)

    async def collector_heartbeat(self, collector: str, lease_ms: int) -> tuple[int, list[str]]:
        """Renew this collector's membership; returns Redis's time (ms) and every live collector,
        itself included."""
        now, members = await self._membership(keys=[keys.COLLECTORS], args=[collector, lease_ms])
        return int(now), sorted(m.decode() for m in members)

    async def leave_collectors(self, collector: str) -> None:
        await self.redis.zrem(keys.COLLECTORS, collector)

    # -- the picker's request path ---------------------------------------------

    async def lookup(self, pool: str, block_hashes: Sequence[str], leave_out: str = "") -> SharedView:
        """In-flight figures over the live replicas but `leave_out`, prefix holders, live replicas.

        Block hashes are hex digests: the scripts take them as one space-separated argument.
        """
        inflight, matched, replicas, backlog = await self._lookup(
            keys=[keys.pickers(pool)], args=[keys.pool_prefix(pool), leave_out, " ".join(block_hashes)])
        figures = _pairs(inflight)
        counts, work = split_figures(figures)
        return SharedView(counts, _pairs(matched), work, tuple(sorted(r.decode() for r in replicas)),
                          model_figures(figures),
                          {backlog[i].decode(): (float(backlog[i + 1]), int(backlog[i + 2]))
                           for i in range(0, len(backlog), 3)})

    async def admit(self, pool: str, replica: str, endpoint: str, lease_ms: int, work_blocks: int = 0,
                    others_seen: int = -1, model: str = "", prefill_blocks_per_s: float = 0.0) -> bool:
        """Count a request (and its `work_blocks` of uncached prompt, and one for its `model`) in flight at `endpoint`,
        and add its blocks to the endpoint's prefill backlog, drained at `prefill_blocks_per_s` (0: unknown).

        False, with nothing written, when `others_seen` (0 or more) is below the other
        replicas' requests there now: one of them chose the endpoint since the caller's lookup.
        """
        return bool(await self._admit(keys=[keys.pickers(pool)], args=[
            keys.pool_prefix(pool), replica, endpoint, lease_ms, work_blocks, others_seen, model,
            f"{prefill_blocks_per_s:.3f}"]))

    async def write(self, pool: str, writes: Sequence[Write]) -> int:
        """Apply `writes` in order in one round trip; returns how many prefix blocks the index writes evicted."""
        args: list[str | int] = [keys.pool_prefix(pool)]
        for w in writes:
            if isinstance(w, IndexWrite):
                args += ["i", w.endpoint, w.prefix_ttl_ms, w.capacity_blocks, " ".join(w.block_hashes)]
            else:
                args += ["r", w.replica, w.endpoint, w.work_blocks, w.model]
        return int(await self._writes(keys=[keys.pickers(pool)], args=args))

    async def index(self, pool: str, endpoint: str, block_hashes: Sequence[str], prefix_ttl_ms: int,
                    capacity_blocks: int) -> int:
        """Note that `endpoint` now holds the prompt's blocks; returns how many its LRU evicted."""
        return await self.write(pool, [IndexWrite(endpoint, block_hashes, prefix_ttl_ms, capacity_blocks)])

    async def release(self, pool: str, replica: str, endpoint: str, work_blocks: int = 0, model: str = "") -> None:
        await self.write(pool, [ReleaseWrite(replica, endpoint, work_blocks, model)])

    async def publish(self, pool: str, replica: str, lease_ms: int, figures: Mapping[str, int]) -> None:
        """Replace the replica's in-flight record with its own figures and renew its lease (its heartbeat)."""
        pairs = [x for name, n in figures.items() if n > 0 for x in (name, n)]
        await self._publish(keys=[keys.pickers(pool), keys.inflight(pool, replica)], args=[replica, lease_ms, *pairs])

    async def forget_endpoint(self, pool: str, endpoint: str, batch: int = 1000) -> None:
        """Drop the endpoint from the prefix index: its KV cache is gone."""
        lru, prefix = keys.endpoint_lru(pool, endpoint), keys.pool_prefix(pool)
        while int(await self._forget(keys=[lru], args=[prefix, endpoint, batch])):
            pass

    # -- flow control's queue (the picker's request path under saturation) -------

    async def enqueue(self, pool: str, replica: str, priority: int, tenant: str, ttl_ms: int,
                      max_queued: int) -> str | None:
        """Queue a request owned by `replica`; its ticket, or None when the queue is full."""
        ticket = await self._enqueue(keys=[keys.queue(pool)], args=[
            keys.pool_prefix(pool), replica, priority, tenant, ttl_ms, max_queued])
        return ticket.decode() if ticket else None

    async def dispatch(self, pool: str, replica: str, room: int, grant_ms: int,
                       reserve: int = 0) -> tuple[list[tuple[str, str]], int]:
        """Let up to `room` (less the outstanding grants) waiting requests go, in order, those of
        priority 0 or less only while more than `reserve` is free; returns the (owner, ticket) pairs
        let through and how many dead or expired tickets were dropped."""
        flat, dropped = await self._dispatch(keys=[keys.queue(pool)], args=[
            keys.pool_prefix(pool), room, grant_ms, replica, pool, reserve])
        return [(flat[i].decode(), flat[i + 1].decode()) for i in range(0, len(flat), 2)], int(dropped)

    async def leave(self, pool: str, ticket: str) -> str:
        """The ticket leaves the queue; returns whether it was 'waiting', 'granted' or 'gone'."""
        state: bytes = await self._leave(keys=[keys.queue(pool)], args=[keys.pool_prefix(pool), ticket])
        return state.decode()

    async def ticket_states(self, pool: str, tickets: Sequence[str]) -> dict[str, str]:
        """ticket -> 'waiting', 'granted' or 'gone': what a replica checks when a grant message may be lost."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zmscore(keys.queue(pool), list(tickets))
            pipe.zmscore(keys.queue_grants(pool), list(tickets))
            waiting, granted = await pipe.execute()
        return {t: "waiting" if w is not None else "granted" if g is not None else "gone"
                for t, w, g in zip(tickets, waiting, granted, strict=True)}

    async def grants(self, replica: str) -> AsyncIterator[tuple[str, str]]:
        """(pool, ticket) each time another replica lets one of `replica`'s waiting requests go."""
        async with self.redis.pubsub() as pubsub:
            await pubsub.subscribe(keys.grants_channel(replica))
            async for message in pubsub.listen():
                if message["type"] == "message":
                    pool, _, ticket = message["data"].decode().partition("\n")
                    yield pool, ticket

    async def queue_view(self, pool: str) -> tuple[list[tuple[str, int, int, int, str]], int]:
        """Every waiting request as (owner, priority, deadline ms, enqueued ms, tenant), in arrival order,
        and how many grants are outstanding."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrange(keys.queue(pool), 0, -1)
            pipe.hgetall(keys.queue_tickets(pool))
            pipe.zcard(keys.queue_grants(pool))
            order, metas, grants = await pipe.execute()
        out = []
        for ticket in order:
            meta = metas.get(ticket)
            if meta is not None:
                owner, priority, deadline, enqueued, tenant = meta.decode().split("|", 4)
                out.append((owner, int(priority), int(deadline), int(enqueued), tenant))
        return out, int(grants)

    # -- what the admin API shows: reads only, except drains and the pickers' hit counts --------

    async def read_fleet(self, pools: Sequence[str]) -> FleetView:
        """Every member as Redis knows it: picker leases per pool, collector leases, the controller leader."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrange(keys.COLLECTORS, 0, -1, withscores=True)
            pipe.get(keys.LEADER)
            for pool in pools:
                pipe.zrange(keys.pickers(pool), 0, -1, withscores=True)
            collectors, leader, *pickers = await pipe.execute()
        return FleetView(
            {m.decode(): int(s) for m, s in collectors}, leader.decode() if leader else None,
            {pool: {m.decode(): int(s) for m, s in rows} for pool, rows in zip(pools, pickers, strict=True)})

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

    async def add_hit_counts(self, minute: int, counts: Mapping[tuple[str, str], tuple[int, int]],
                             keep_s: int = 7200) -> None:
        """Add (pool, model) -> (queried, matched) prefix blocks to one minute's totals."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for (pool, model), (queried, matched) in counts.items():
                key = keys.hit_counts(pool, minute)
                pipe.hincrby(key, f"{model}|queried", queried)
                pipe.hincrby(key, f"{model}|matched", matched)
                pipe.expire(key, keep_s)
            await pipe.execute()

    async def hit_counts(self, pool: str, minutes: Sequence[int]) -> dict[int, dict[str, tuple[int, int]]]:
        """minute -> model -> (queried, matched) prefix blocks, summed over the pickers."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for minute in minutes:
                pipe.hgetall(keys.hit_counts(pool, minute))
            replies = await pipe.execute()
        out: dict[int, dict[str, tuple[int, int]]] = {}
        for minute, reply in zip(minutes, replies, strict=True):
            fields = {k.decode(): int(v) for k, v in reply.items()}
            models = {f.rpartition("|")[0] for f in fields}
            out[minute] = {m: (fields.get(f"{m}|queried", 0), fields.get(f"{m}|matched", 0)) for m in models}
        return out
