"""The routing configuration: written by the controller leader (fenced by its lease), read by everyone."""

from __future__ import annotations

from redis.asyncio import Redis, RedisCluster

from gateway_state import keys, scripts
from gateway_state.records import Config, decode_config, encode_config
from gateway_state.redis_state import RedisState
from gateway_state.script_link import ScriptLink


class Deposed(Exception):
    """A write fenced off: the writer's leader lease has passed to another controller."""


class ConfigStore(RedisState):
    def __init__(self, redis: Redis | RedisCluster, link: ScriptLink | None = None) -> None:
        super().__init__(redis, link)
        self._lease = redis.register_script(scripts.LEASE)
        self._fenced_set = redis.register_script(scripts.FENCED_SET)

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
