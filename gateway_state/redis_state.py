"""The Redis connection every concern of the shared state uses (`StateStore` composes them)."""

from __future__ import annotations

from redis.asyncio import Redis, RedisCluster

from gateway_state.script_link import ScriptLink


class RedisState:
    def __init__(self, redis: Redis | RedisCluster, link: ScriptLink | None = None) -> None:
        """`link`: the lean connection the picker's request-path scripts (lookup, admit, the writes after)
        take instead of redis-py, to the same Redis (see script_link). Scripts are registered by each
        concern; registering does no I/O: they load on first use (EVALSHA, then EVAL)."""
        self.redis = redis
        self.link = link

    async def now_ms(self) -> int:
        """Redis's clock (a Redis Cluster answers from one of its nodes)."""
        reply = await self.redis.time()
        if isinstance(reply, dict):
            reply = next(iter(reply.values()))
        return int(reply[0]) * 1000 + int(reply[1]) // 1000  # TIME's (seconds, microseconds)
