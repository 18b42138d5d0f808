"""The prefix index as the engines report it: written by the collector that owns each endpoint, from the
endpoint's KV-cache events; read by pickers (LOOKUP) and the admin API."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis, RedisCluster

from gateway_state import keys, scripts
from gateway_state.placement_store import MAX_HOLDER_RUN, PlacementStore, holder_writes, split_member
from gateway_state.records import KvStreamStatus, decode_kv_status, encode_kv_status
from gateway_state.redis_state import RedisState
from gateway_state.script_link import ScriptLink


@dataclass(frozen=True)
class Stored:
    engine_hash: str  # the engine's name of the block, opaque
    key: str  # ours (block_keys), 16 hex digits
    bucket: int  # the bucket of the chain it is in (keys.index_bucket of the chain's first block)


@dataclass(frozen=True)
class Removed:
    engine_hash: str
    key: str
    bucket: int


@dataclass(frozen=True)
class Cleared:
    pass


KvOp = Stored | Removed | Cleared


# The most holder writes (each of up to placement_store.MAX_HOLDER_RUN blocks) one call to a bucket carries.
HOLDER_CALL = 8
# On one Redis, a batch of at most this many blocks is one call; a larger one (a resync that drops every
# block of an endpoint) goes in chunks as on a cluster, so no script holds Redis for long.
ONE_CALL_BLOCKS = HOLDER_CALL * MAX_HOLDER_RUN


class KvIndexStore(RedisState):
    """An endpoint's blocks as its engine names them live in the endpoint's map (keys.kv_blocks), their
    holders in the pool's index buckets. On one Redis a batch is one call (scripts.KV_APPLY). On a cluster,
    and for a batch larger than ONE_CALL_BLOCKS, it writes the holders first, then the map, then the
    stream's status (its sequence number): a collector that dies between them leaves a status that names
    an earlier batch, and its successor applies the batch again (every operation of it can be applied
    twice)."""

    def __init__(self, redis: Redis | RedisCluster, link: ScriptLink | None = None) -> None:
        super().__init__(redis, link)
        self._map = redis.register_script(scripts.KV_MAP)
        self._apply = None if isinstance(redis, RedisCluster) else redis.register_script(scripts.KV_APPLY)
        self._legacy_drop = redis.register_script(scripts.LEGACY_DROP)
        self._holders = PlacementStore(redis)

    async def kv_apply(self, pool: str, endpoint: str, ops: Sequence[KvOp], status: KvStreamStatus) -> int:
        """Apply one batch of the endpoint's events and its stream status; returns the endpoint's blocks in
        the index. A clear removes the blocks the ops before it name: the caller lists what the endpoint held."""
        changes: list[tuple[int | str, int | None, str]] = []
        mapped: list[str | int] = []
        for op in ops:
            if isinstance(op, Stored):
                changes.append((op.bucket, 0, op.key))
                mapped += ["s", op.engine_hash, f"{op.key}/{op.bucket}"]
            elif isinstance(op, Removed):
                changes.append((op.bucket, None, op.key))
                mapped += ["r", op.engine_hash, ""]
            else:
                mapped += ["c", "", ""]
        if self._apply is not None and len(changes) <= ONE_CALL_BLOCKS:
            holders = [a for args in holder_writes(endpoint, changes).values() for a in args]
            return int(await self._apply(keys=[keys.kv_blocks(pool, endpoint), keys.kv_streams(pool)], args=[
                keys.pool_prefix(pool), endpoint, encode_kv_status(status), len(holders) // scripts.WRITE_ARGS,
                *holders, *mapped]))
        await self._write_holders(pool, endpoint, changes)
        held = int(await self._map(keys=[keys.kv_blocks(pool, endpoint)], args=mapped)) if mapped else \
            int(await self.redis.hlen(keys.kv_blocks(pool, endpoint)))
        await self.redis.hset(keys.kv_streams(pool), endpoint, encode_kv_status(status))
        return held

    async def _write_holders(self, pool: str, endpoint: str,
                             changes: Sequence[tuple[int | str, int | None, str]]) -> None:
        """Holder changes (placement_store.holder_writes), in calls of at most HOLDER_CALL writes per bucket."""
        by_bucket = holder_writes(endpoint, changes)
        step = HOLDER_CALL * scripts.WRITE_ARGS
        for start in range(0, max((len(a) for a in by_bucket.values()), default=0), step):
            await self._holders.write_holders(pool, {b: a[start:start + step] for b, a in by_bucket.items()})

    async def kv_block_map(self, pool: str, endpoint: str) -> dict[str, tuple[str, int]]:
        """engine hash -> (our key, bucket), of the blocks the endpoint's engine holds as the index knows them."""
        return await self._block_map(keys.kv_blocks(pool, endpoint))

    async def _block_map(self, key: str) -> dict[str, tuple[str, int]]:
        raw = await self.redis.hgetall(key)
        out = {}
        for k, v in raw.items():
            key, bucket = split_member(v)
            out[_text(k)] = (key, int(bucket))
        return out

    async def drop_legacy(self, pool: str, endpoint: str) -> int:
        """Remove the endpoint's entries of the earlier layouts: before the index was spread over buckets
        (keys.legacy_kv_blocks), and before the endpoint's tag was a hash of its name (its map under
        keys.earlier_endpoint_prefix, its holders as today's). Returns how many blocks they named (then the
        endpoint's entries are rebuilt)."""
        dropped = int(await self._legacy_drop(keys=[keys.legacy_kv_blocks(pool, endpoint)],
                                              args=[keys.pool_prefix(pool), endpoint]))
        earlier = keys.earlier_endpoint_prefix(pool, endpoint) + "kvmap"
        if blocks := await self._block_map(earlier):
            await self._write_holders(pool, endpoint, [(bucket, None, key) for key, bucket in blocks.values()])
            await self.redis.delete(earlier)
        return dropped + len(blocks)

    async def event_depth(self, pool: str, endpoint: str, block_hashes: Sequence[str]) -> int:
        """How many leading blocks of a prompt the endpoint's engine reported cached (speculative entries aside)."""
        if not block_hashes:
            return 0
        bucket = keys.index_bucket(block_hashes[0])
        async with self.redis.pipeline(transaction=False) as pipe:
            for h in block_hashes:
                pipe.hexists(keys.prefix_block(pool, bucket, h), endpoint)
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
        blocks = await self.kv_block_map(pool, endpoint)
        await self._write_holders(pool, endpoint, [(bucket, None, key) for key, bucket in blocks.values()])
        await self.redis.delete(keys.kv_blocks(pool, endpoint))
        await self.redis.hdel(keys.kv_streams(pool), endpoint)
        await self.drop_legacy(pool, endpoint)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
