"""Affinity that only the shared prefix index gives: prefixes placed before every picker restarted return to
their pods. The rendezvous home is disabled (`prefix_home_weight=0`): it sends a prefix nobody holds to the
same pod from every replica with no shared state at all, so with it a test like this passes on per-replica
memory too. The control runs the same test on per-replica state (`--state local`, forgotten at restart),
where the prefixes must not all return."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from local_fleet.fleet import Fleet, FleetSettings
from tests.client import chat, post
from tests.conftest import free_port, own_net, prefix_pool_manifests

NET = own_net(20, 120)
PREFIXES = 12


@pytest.fixture(scope="module", params=["redis", "local"])
def affinity_fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    port = free_port()
    state = ("--state", "local") if request.param == "local" else ()
    settings = FleetSettings(
        manifests_dir=prefix_pool_manifests(tmp_path_factory.mktemp("affinity-manifests"), port, NET),
        work_dir=tmp_path_factory.mktemp("affinity-fleet"), redis_port=free_port(),
        picker_ports=(free_port(), free_port()), picker_metrics_ports=(free_port(), free_port()),
        picker_admin_ports=(), envoy_admin_port=free_port(), resync_interval_ms=300,
        picker_args=("--scheduling", "prefix_home_weight=0", *state), simulator_args=("--time-scale", "0.1"))
    fleet = Fleet(settings)
    fleet.listen_port = port  # type: ignore[attr-defined]
    fleet.shared = request.param == "redis"  # type: ignore[attr-defined]
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def test_prefixes_return_to_their_pods_after_every_picker_restarts(http: aiohttp.ClientSession,
                                                                         affinity_fleet: Fleet) -> None:
    fleet, port = affinity_fleet, affinity_fleet.listen_port  # type: ignore[attr-defined]
    prompts = [f"conversation {i} shares this long opening: " + " ".join(f"w{i}x{j}" for j in range(120))
               for i in range(PREFIXES)]

    async def pods(turn: str) -> list[str | None]:
        replies = [await post(http, port, chat(f"{prompt} {turn}", max_tokens=2)) for prompt in prompts]
        assert [r.status for r in replies] == [200] * PREFIXES
        return [r.pod for r in replies]

    before = await pods("turn 1")
    assert len(set(before)) >= 2, before  # spread: a test where one pod takes everything proves nothing
    await asyncio.sleep(0.5)  # the index writes follow the answers
    for name in ("picker-0", "picker-1"):
        fleet.restart(name)
    fleet.wait_pickers_routable(30.0)
    after = await pods("turn 2")
    kept = sum(a == b for a, b in zip(before, after, strict=True))
    print(f"\n{'shared' if fleet.shared else 'per-replica'} state: {kept}/{PREFIXES} "  # type: ignore[attr-defined]
          "prefixes back on their pods after every picker restarted")
    if fleet.shared:  # type: ignore[attr-defined]
        assert kept == PREFIXES, (before, after)
    else:  # the control: per-replica memory forgot every prefix
        assert kept < PREFIXES, (before, after)
