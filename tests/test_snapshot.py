"""The picker's snapshot: follows the config, forgets departed endpoints, survives a flushed Redis, and
tells of restarted servers."""

from __future__ import annotations

import time

from redis.asyncio import Redis

from gateway_state.clock import FleetClock
from gateway_state.records import Config, Endpoint, LoadSample, Pool
from gateway_state.store import StateStore
from picker.settings import StateSettings
from picker.snapshot import SnapshotSource
from picker.state import MemoryState
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


async def test_a_restarted_server_leaves_the_pickers_own_prefix_index(redis_client: Redis) -> None:
    """The collectors forget a restarted server's blocks in Redis's index; the picker forgets them in its
    own (what it routes by while Redis cannot answer) when its snapshot sees the prefill counter fall."""
    store, memory = StateStore(redis_client), MemoryState()
    await publish(store, Config(1, {"p": pool("10.0.0.1", "10.0.0.2")}, {}))
    blocks = ["a1", "b2", "c3"]
    for key in ("10.0.0.1:8000", "10.0.0.2:8000"):
        await memory.index("p", key, blocks, 60_000, 100)

    async def scraped(tokens: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        await store.write_load("p", {k: LoadSample(now, True, prompt_tokens=t) for k, t in tokens.items()})
        await snapshots.refresh_once()

    snapshots = SnapshotSource(store, StateSettings(), FleetClock(), on_restart=memory.forget_endpoint)
    await snapshots.refresh_once()
    await scraped({"10.0.0.1:8000": 5_000, "10.0.0.2:8000": 7_000})
    await scraped({"10.0.0.1:8000": 6_000, "10.0.0.2:8000": 7_500})  # both served more
    assert memory.matched("p", blocks) == {"10.0.0.1:8000": 3, "10.0.0.2:8000": 3}
    await scraped({"10.0.0.1:8000": 6_000, "10.0.0.2:8000": 40})  # the second is a new process
    assert memory.matched("p", blocks) == {"10.0.0.1:8000": 3}
    await memory.index("p", "10.0.0.2:8000", blocks[:1], 60_000, 100)  # it caches again from scratch
    assert memory.matched("p", blocks) == {"10.0.0.1:8000": 3, "10.0.0.2:8000": 1}
