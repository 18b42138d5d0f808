"""Prefix routing on the engines' own KV-cache events, through the whole fleet (examples/kv-events/).

Envoy, the controller, a collector following each simulated vLLM pod's events, and two pickers that
tokenize each prompt with the model's tokenizer: the seeds' round1/round2 land on one pod, every
replica (and a restarted one) reads the same exact index, and the index says which blocks the
engine reported and which the pickers only expect.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from gateway_state.records import pool_id
from gateway_state.store import StateStore
from local_fleet.fleet import Fleet, FleetSettings
from tests.client import QWEN, post, wait_for
from tests.conftest import FIXTURES, free_port, own_net, relocated

EXAMPLE = Path(__file__).parent.parent / "examples" / "kv-events"
PREFIX_PORT, PLAIN_PORT = free_port(), free_port()
NET = own_net(230, 235)
POOL = pool_id("default", "events-pool")


@pytest.fixture(scope="module")
def events_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    manifests = tmp_path_factory.mktemp("events-manifests")
    for path in EXAMPLE.glob("*.yaml"):
        (manifests / path.name).write_text(relocated(path.read_text(), {8080: PREFIX_PORT, 8081: PLAIN_PORT}, NET))
    settings = FleetSettings(
        manifests_dir=manifests, work_dir=tmp_path_factory.mktemp("events-fleet"), redis_port=free_port(),
        picker_ports=(free_port(), free_port()), picker_metrics_ports=(free_port(), free_port()),
        picker_admin_ports=(free_port(), free_port()), envoy_admin_port=free_port(),
        simulator_args=("--time-scale", "0.1"))
    fleet = Fleet(settings)
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


@pytest.fixture
async def store(events_fleet: Fleet) -> AsyncIterator[StateStore]:
    redis = Redis.from_url(events_fleet.redis_url)
    yield StateStore(redis)
    await redis.aclose()


async def explain(http: aiohttp.ClientSession, fleet: Fleet, body: bytes, index: int) -> dict:
    async with http.post(f"http://127.0.0.1:{fleet.settings.picker_admin_ports[index]}/admin/explain",
                         params={"pool": POOL}, data=body,
                         headers={"Authorization": f"Bearer {fleet.admin_tokens['read']}"}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def test_every_pod_streams_its_events_into_the_index(events_fleet: Fleet, store: StateStore) -> None:
    async def all_live() -> bool:
        statuses = await store.kv_statuses(POOL)
        return len(statuses) == 3 and all(s.live for s in statuses.values())

    await wait_for(all_live, 20.0)  # each stream is live once its replay socket answered


async def test_round2_lands_where_round1_is_cached_and_every_replica_sees_it(
        events_fleet: Fleet, http: aiohttp.ClientSession, store: StateStore) -> None:
    round1, round2 = (FIXTURES / "round1.txt").read_bytes(), (FIXTURES / "round2.txt").read_bytes()
    first = await post(http, PREFIX_PORT, None, raw=round1)
    assert first.status == 200, first.text
    home = first.endpoint
    assert home is not None

    async def confirmed() -> bool:  # the engine's events for round1's blocks reached the index
        explained = await explain(http, events_fleet, round2, 0)
        return explained["matched_by_source"].get(home, {}).get("event", 0) > 0

    await wait_for(confirmed, 10.0)
    await asyncio.sleep(2.5)  # past the speculative entries' lifetime: what remains is the engine's word
    views = [await explain(http, events_fleet, round2, i) for i in (0, 1)]
    for view in views:
        assert view["prefix_index"] == "events"
        assert view["pick"] == home, view
        assert view["matched_by_source"][home]["speculative"] == 0
        assert view["matched_blocks"][home] == view["matched_by_source"][home]["event"] > 0
    assert views[0]["matched_blocks"] == views[1]["matched_blocks"]
    second = await post(http, PREFIX_PORT, None, raw=round2)
    assert second.status == 200 and second.endpoint == home
    # A restarted replica reads the same index: nothing of it lived in the replica.
    events_fleet.restart("picker-1")
    events_fleet.wait_pickers_ready()

    async def admin_up() -> bool:
        try:
            async with http.get(f"http://127.0.0.1:{events_fleet.settings.picker_admin_ports[1]}/healthz") as r:
                return r.status < 500
        except aiohttp.ClientError:
            return False

    await wait_for(admin_up, 20.0)
    await asyncio.sleep(2.5)  # round2's own speculative entries pass
    again, other = await explain(http, events_fleet, round2, 1), await explain(http, events_fleet, round2, 0)
    assert again["pick"] == home and again["matched_blocks"] == other["matched_blocks"]
    assert again["matched_blocks"][home] > views[1]["matched_blocks"][home]  # round2's own blocks, reported since
    status = (await store.kv_statuses(POOL))[home]
    assert status.blocks > 0 and status.block_size == 16 and (status.gaps, status.resyncs, status.garbage) == (0, 0, 0)
    async with http.get(f"http://127.0.0.1:{events_fleet.settings.picker_admin_ports[0]}"
                        "/admin/pools/default/events-pool/prefix",
                        headers={"Authorization": f"Bearer {events_fleet.admin_tokens['read']}"}) as r:
        prefix = await r.json()
    assert prefix["prefix_index"] == "events"
    shown = next(e for e in prefix["endpoints"] if e["endpoint"] == home)
    assert shown["stream"]["state"] == "live" and shown["blocks_held"] >= status.blocks > 0


async def test_a_placement_counts_speculatively_until_the_engine_reports_it(
        events_fleet: Fleet, http: aiohttp.ClientSession) -> None:
    """Two requests sharing a long new prefix, the second sent as soon as the first is placed: it follows the
    first on the pickers' speculative entry, before any event could have said so."""
    prefix = "A brand new shared document about kv events and routing. " * 40
    bodies = [{"model": QWEN, "messages": [{"role": "user", "content": prefix + f" question {i}"}],
               "max_tokens": 64} for i in range(2)]
    first = asyncio.create_task(post(http, PREFIX_PORT, bodies[0]))
    await asyncio.sleep(0.05)
    second = await post(http, PREFIX_PORT, bodies[1])
    one = await first
    assert one.status == second.status == 200
    assert one.endpoint == second.endpoint
