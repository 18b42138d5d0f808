"""The prefix index as the engines report it: written by the collector that owns each endpoint, from the
endpoint's KV-cache events; read by pickers (LOOKUP) and the admin API."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis, RedisCluster

from gateway_state import keys, scripts
from gateway_state.records import KvStreamStatus, decode_kv_status, encode_kv_status
from gateway_state.redis_state import RedisState
from gateway_state.script_link import ScriptLink


@dataclass(frozen=True)
class Stored:
    engine_hash: str  # the engine's name of the block, opaque
    key: str  # ours (block_keys), 16 hex digits


@dataclass(frozen=True)
class Removed:
    engine_hash: str


@dataclass(frozen=True)
class Cleared:
    pass


KvOp = Stored | Removed | Cleared


class KvIndexStore(RedisState):
    def __init__(self, redis: Redis | RedisCluster, link: ScriptLink | None = None) -> None:
        super().__init__(redis, link)
        self._kv_apply = redis.register_script(scripts.KV_APPLY)

    async def kv_apply(self, pool: str, endpoint: str, ops: Sequence[KvOp], status: KvStreamStatus) -> int:
        """Apply one batch of the endpoint's events and its stream status, in one call; returns the
        endpoint's blocks in the index."""
        args: list[str | int] = [keys.pool_prefix(pool), endpoint, encode_kv_status(status).decode()]
        for op in ops:
            if isinstance(op, Stored):
                args += ["s", op.engine_hash, op.key]
            elif isinstance(op, Removed):
                args += ["r", op.engine_hash, ""]
            else:
                args += ["c", "", ""]
        return int(await self._kv_apply(keys=[keys.kv_streams(pool)], args=args))

    async def kv_block_map(self, pool: str, endpoint: str) -> dict[str, str]:
        """engine hash -> our key, of the blocks the endpoint's engine holds as the index knows them."""
        raw = await self.redis.hgetall(keys.kv_blocks(pool, endpoint))
        return {_text(k): _text(v) for k, v in raw.items()}

    async def event_depth(self, pool: str, endpoint: str, block_hashes: Sequence[str]) -> int:
        """How many leading blocks of a prompt the endpoint's engine reported cached (speculative entries aside)."""
        if not block_hashes:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for h in block_hashes:
                pipe.hexists(keys.prefix_block(pool, h), endpoint)
            held = await pipe.execute()
        return next((i for i, h in enumerate(held) if not h), len(held))

    async def kv_statuses(self, pool: str) -> dict[str, KvStreamStatus]:
        raw = await self.redis.hgetall(keys.kv_streams(pool))
        return {_text(e): decode_kv_status(v) for e, v in raw.items() if v}

    async def write_kv_statuses(self, pool: str, statuses: Mapping[str, KvStreamStatus]) -> None:
        if statuses:
            await self.redis.hset(keys.kv_streams(pool),
                                  mapping={e: encode_kv_status(s) for e, s in statuses.items()})

    async def drop_kv_endpoint(self, pool: str, endpoint: str) -> None:
        """The endpoint left its pool: its blocks leave the index, and its stream's status goes."""
        await self._kv_apply(keys=[keys.kv_streams(pool)], args=[keys.pool_prefix(pool), endpoint, "", "c", "", ""])
        await self.redis.hdel(keys.kv_streams(pool), endpoint)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
