"""The picker's local snapshot of config and load, refreshed from Redis in one round trip.

Missing config in Redis means Redis lost it (a flush, a failover), not that the
fleet has none, so the last known config stays until the controller rewrites it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from gateway_state.clock import FleetClock
from gateway_state.lifecycle import every
from gateway_state.records import Config, LoadSample, decode_config
from gateway_state.store import StateStore
from picker.intake import PoolEvents
from picker.metrics import PickerMetrics
from picker.settings import StateSettings

log = logging.getLogger("picker.snapshot")
CLOCK_REFRESH_S = 1.0  # clocks drift by microseconds per second: a reading a second is plenty


@dataclass(frozen=True)
class Snapshot:
    config: Config | None = None
    load: dict[str, dict[str, LoadSample]] = field(default_factory=dict)  # pool -> endpoint -> sample
    drained: dict[str, frozenset[str]] = field(default_factory=dict)  # pool -> endpoints drained by an operator
    queued: dict[str, int] = field(default_factory=dict)  # pool -> requests waiting in its fleet queue
    # pool -> what its KV-event streams and samples tell intake (pools indexed from engine events)
    kv_events: dict[str, PoolEvents] = field(default_factory=dict)


class SnapshotSource:
    def __init__(self, store: StateStore, settings: StateSettings, clock: FleetClock,
                 metrics: PickerMetrics | None = None,
                 on_restart: Callable[[str, str], None] | None = None) -> None:
        """`on_restart(pool, endpoint)`: called when a sample shows the endpoint's server restarted."""
        self._store = store
        self._on_restart = on_restart
        self._clock = clock
        self._metrics = metrics
        self._clock_read_at = -CLOCK_REFRESH_S
        self._settings = settings
        self._raw: bytes | None = None
        self.current = Snapshot()
        self.redis_ok = False
        self._reported: bool | None = None  # the Redis state last logged

    async def refresh_once(self) -> None:
        pools = list(self.current.config.pools) if self.current.config else []
        timeout = max(self._settings.redis_timeout_ms * 10, 200) / 1000
        try:
            if time.monotonic() - self._clock_read_at >= CLOCK_REFRESH_S:
                async with asyncio.timeout(timeout):
                    self._clock.observe(await self._store.now_ms())
                self._clock_read_at = time.monotonic()
            async with asyncio.timeout(timeout):
                reply = await self._store.read_snapshot(pools)
        except (RedisError, OSError, TimeoutError) as exc:
            if self._reported is not False:
                log.warning("Redis unreachable, routing from the last snapshot: %s", exc or type(exc).__name__)
            self.redis_ok = self._reported = False
            return
        if self._reported is not True:
            log.info("Redis reachable")
        self.redis_ok = self._reported = True
        if self._metrics is not None:
            self._metrics.snapshot_refreshes.inc()
        raw, load = reply.config, reply.load
        config = self.current.config
        if raw is not None and raw != self._raw:
            try:
                config = decode_config(raw)
                self._raw = raw
                log.info("config generation %d: %d pools, %d models", config.generation, len(config.pools),
                         len(config.models))
            except (ValueError, KeyError, TypeError) as exc:
                log.error("undecodable config in Redis, keeping the last one: %s", exc)
        # Samples missing after a flush keep their last value until they age out.
        # Only endpoints still in their pool stay, so pod churn does not grow the snapshot.
        merged = {}
        for pool, samples in load.items():
            members = {e.key for e in config.pools[pool].endpoints} if config and pool in config.pools else set()
            previous = self.current.load.get(pool, {})
            merged[pool] = {e: s for e, s in {**previous, **samples}.items() if e in members}
            if self._on_restart is not None:
                for e, s in samples.items():
                    if e in previous and s.restarted_since(previous[e]):
                        self._on_restart(pool, e)
        events = {pool: PoolEvents.of(streams, merged.get(pool, {})) for pool, streams in reply.kv_streams.items()}
        self.current = Snapshot(config, merged, reply.drained, reply.queued, events)

    async def run(self, stop: asyncio.Event) -> None:
        await every(self._settings.snapshot_refresh_ms / 1000, stop, self.refresh_once)
