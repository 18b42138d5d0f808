"""Load samples, drains and the gateways' bypass figures: written by collectors (drains by the admin API),
read by pickers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from redis.asyncio import Redis, RedisCluster

from gateway_state import keys
from gateway_state.records import (
    BypassSample,
    KvStreamStatus,
    LoadSample,
    decode_bypass,
    decode_kv_status,
    decode_load,
    encode_bypass,
    encode_load,
)
from gateway_state.redis_state import RedisState
from gateway_state.script_link import ScriptLink


@dataclass(frozen=True)
class SnapshotReply:
    """What a picker refreshes from Redis in one round trip."""

    config: bytes | None  # encoded; None when Redis holds none
    load: dict[str, dict[str, LoadSample]]  # pool -> endpoint -> sample
    drained: dict[str, frozenset[str]]  # pool -> endpoints an operator drained
    queued: dict[str, int] = field(default_factory=dict)  # pool -> requests waiting in its queue
    # pool -> endpoint -> its KV-event stream, for pools whose index comes from engine events
    kv_streams: dict[str, dict[str, KvStreamStatus]] = field(default_factory=dict)


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    """A hash as Redis sends it (field, value, ...) as a dict."""
    return dict(zip(flat[0::2], flat[1::2], strict=True))


class LoadStore(RedisState):
    def __init__(self, redis: Redis | RedisCluster, link: ScriptLink | None = None) -> None:
        super().__init__(redis, link)
        self._samples: dict[bytes, LoadSample] = {}  # the last snapshot read's samples, by their encoding

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
        """The encoded config and the load samples of `pools`, in one round trip. A sample whose encoding is
        the one read last time is not decoded again (collectors rewrite each at their scrape interval)."""
        commands: list[tuple[str, ...]] = [("GET", keys.CONFIG)]
        for pool in pools:
            commands += [("HGETALL", keys.load(pool)), ("HKEYS", keys.drained(pool)), ("ZCARD", keys.queue(pool)),
                         ("HGETALL", keys.kv_streams(pool))]
        if self.link is not None:  # plain Redis: the lean connection's pipeline
            raw, *replies = await self.link.commands(commands)
            replies = [_pairs(r) if c[0] == "HGETALL" else r for c, r in zip(commands[1:], replies, strict=True)]
        else:
            async with self.redis.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                raw, *replies = await pipe.execute()
        loads, drains, queued, streams = replies[0::4], replies[1::4], replies[2::4], replies[3::4]
        decoded: dict[bytes, LoadSample] = {}
        load: dict[str, dict[str, LoadSample]] = {}
        for pool, reply in zip(pools, loads, strict=True):
            load[pool] = {}
            for e, v in reply.items():
                sample = self._samples.get(v) or decode_load(v)
                load[pool][e.decode()] = decoded[v] = sample
        self._samples = decoded
        return SnapshotReply(
            raw, load,
            {pool: frozenset(e.decode() for e in reply) for pool, reply in zip(pools, drains, strict=True) if reply},
            {pool: int(n) for pool, n in zip(pools, queued, strict=True) if n},
            {pool: {e.decode(): decode_kv_status(v) for e, v in reply.items()}
             for pool, reply in zip(pools, streams, strict=True) if reply})

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
