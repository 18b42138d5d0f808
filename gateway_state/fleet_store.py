"""The fleet's members and what the admin API shows of it: collectors' and pickers' leases, the leader,
Redis's clock, the pickers' hit counts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis, RedisCluster

from gateway_state import keys, scripts
from gateway_state.redis_state import RedisState
from gateway_state.script_link import ScriptLink


@dataclass(frozen=True)
class FleetView:
    collectors: dict[str, int]  # collector -> lease expiry (ms, Redis's clock)
    leader: str | None  # the controller leader's "id|epoch"
    pickers: dict[str, dict[str, int]]  # pool -> picker replica -> lease expiry (ms)


class FleetStore(RedisState):
    def __init__(self, redis: Redis | RedisCluster, link: ScriptLink | None = None) -> None:
        super().__init__(redis, link)
        self._membership = redis.register_script(scripts.MEMBERSHIP)

    async def collector_heartbeat(self, collector: str, lease_ms: int) -> tuple[int, list[str]]:
        """Renew this collector's membership; returns Redis's time (ms) and every live collector,
        itself included."""
        now, members = await self._membership(keys=[keys.COLLECTORS], args=[collector, lease_ms])
        return int(now), sorted(m.decode() for m in members)

    async def leave_collectors(self, collector: str) -> None:
        await self.redis.zrem(keys.COLLECTORS, collector)

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
