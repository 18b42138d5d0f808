"""The picker's snapshot: follows the config, forgets departed endpoints, survives a flushed Redis."""

from __future__ import annotations

import time

from redis.asyncio import Redis

from gateway_state.clock import FleetClock
from gateway_state.records import Config, Endpoint, LoadSample, Pool
from gateway_state.store import StateStore
from picker.settings import StateSettings
from picker.snapshot import SnapshotSource
from tests.conftest import publish


def pool(*hosts: str) -> Pool:
    return Pool("p", (8000,), endpoints=tuple(Endpoint(h, h, 8000) for h in hosts))


async def test_departed_endpoints_leave_and_a_flush_keeps_the_last_config(redis_client: Redis) -> None:
    store = StateStore(redis_client)
    sample = LoadSample(int(time.time() * 1000), True, waiting=1)
    await publish(store, Config(1, {"p": pool("10.0.0.1", "10.0.0.2")}, {}))
    await store.write_load("p", {"10.0.0.1:8000": sample, "10.0.0.2:8000": sample})
    snapshots = SnapshotSource(store, StateSettings(), FleetClock())
    await snapshots.refresh_once()
    await snapshots.refresh_once()  # the first refresh learns the pools, the second reads their load
    assert set(snapshots.current.load["p"]) == {"10.0.0.1:8000", "10.0.0.2:8000"}

    await publish(store, Config(2, {"p": pool("10.0.0.1")}, {}))
    await snapshots.refresh_once()
    assert set(snapshots.current.load["p"]) == {"10.0.0.1:8000"}  # even though Redis still holds the other

    await redis_client.flushall()
    await snapshots.refresh_once()
    config = snapshots.current.config
    assert config is not None and config.generation == 2  # lost, not empty: keep routing by it
    assert set(snapshots.current.load["p"]) == {"10.0.0.1:8000"}  # the last sample ages out by itself
