"""The placement state answers alike in Redis and in memory: one protocol, the same calls, the same answers.

The in-memory state only differs in where it lives, so benchmarks comparing the
two measure sharing, not a different algorithm, and unit tests of the placement
run on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from redis.asyncio import Redis, RedisCluster

from gateway_state.placement_store import NEVER_REFUSED, IndexWrite, Option, ReleaseWrite, Weighing
from gateway_state.script_link import ScriptLink
from gateway_state.store import StateStore
from picker.state import MemoryState, PlacementState

LEASE_MS = 5_000


@pytest.fixture(params=["redis", "redis-link", "redis-cluster", "memory"])
async def state(request: pytest.FixtureRequest) -> AsyncIterator[PlacementState]:
    """Redis through redis-py, Redis through the request path's lean link (as the picker uses it), a Redis
    Cluster of three shards (the pool's keys and its index's on different ones), memory."""
    if request.param == "memory":
        yield MemoryState()
        return
    if request.param == "redis-cluster":
        cluster = RedisCluster(host="127.0.0.1", port=request.getfixturevalue("redis_cluster_port"))
        await cluster.flushall()
        yield StateStore(cluster)
        await cluster.aclose()
        return
    redis_client = Redis.from_url(request.getfixturevalue("redis_url"))
    await redis_client.flushall()
    link = ScriptLink.for_client(redis_client) if request.param == "redis-link" else None
    assert link is not None or request.param == "redis"
    yield StateStore(redis_client, link)
    if link is not None:
        link.close()
    await redis_client.aclose()


async def record(state: PlacementState, endpoint: str, hashes: list[str], capacity: int, work: int = 0,
                 replica: str = "r") -> None:
    assert await state.admit("pool", replica, [Option(endpoint, work)], LEASE_MS)
    await state.index("pool", endpoint, hashes, 60_000, capacity)


async def test_longest_prefix_inflight_and_release(state: PlacementState) -> None:
    await record(state, "a", ["1", "2", "3"], 100)
    await record(state, "b", ["1", "x"], 100)
    view = await state.lookup("pool", ["1", "2", "3", "4"])
    assert view.matched_blocks == {"a": 3, "b": 1} and view.inflight == {"a": 1, "b": 1}
    await state.release("pool", "r", "a")
    assert (await state.lookup("pool", [])).inflight == {"b": 1}


async def test_uncached_prompt_work_adds_up_apart_from_the_counts_and_releases(state: PlacementState) -> None:
    await record(state, "a", [], 100, 250)
    await record(state, "a", [], 100, 10)
    await record(state, "b", [], 100)
    view = await state.lookup("pool", [])
    assert view.inflight == {"a": 2, "b": 1} and view.inflight_work == {"a": 260}
    await state.release("pool", "r", "a", 250)
    view = await state.lookup("pool", [])
    assert view.inflight == {"a": 1, "b": 1} and view.inflight_work == {"a": 10}
    await state.release("pool", "r", "a", 10)
    await state.release("pool", "r", "b")
    view = await state.lookup("pool", [])
    assert view.inflight == {} and view.inflight_work == {}


async def test_the_prefill_backlog_drains_at_the_endpoints_speed_between_admissions(state: PlacementState) -> None:
    """Each admission adds its blocks to the endpoint's backlog after draining it at the speed given; the
    lookup says what was recorded and how long ago, and the reader drains it from there."""
    assert await state.admit("pool", "r", [Option("a", 300, blocks_per_s=1000.0)], LEASE_MS)
    assert await state.admit("pool", "r", [Option("b", 0, blocks_per_s=1000.0)], LEASE_MS)  # no work: no backlog
    view = await state.lookup("pool", [])
    assert set(view.prefill_backlog) == {"a"}
    blocks, age_ms = view.prefill_backlog["a"]
    assert blocks == 300 and 0 <= age_ms < 1000
    await asyncio.sleep(0.1)  # about 100 blocks drain at 1,000 a second
    assert await state.admit("pool", "other", [Option("a", 50, blocks_per_s=1000.0)], LEASE_MS)
    blocks, age_ms = (await state.lookup("pool", [])).prefill_backlog["a"]
    assert 150 <= blocks <= 252 and age_ms < 1000  # 300 less what drained, plus 50; recorded anew
    await asyncio.sleep(0.3)  # more than the rest drains
    assert await state.admit("pool", "r", [Option("a", 20, blocks_per_s=1000.0)], LEASE_MS)
    assert (await state.lookup("pool", [])).prefill_backlog["a"][0] == 20
    # At an unknown speed nothing is known to have drained: the backlog restarts from the request's blocks.
    assert await state.admit("pool", "r", [Option("a", 70)], LEASE_MS)
    assert (await state.lookup("pool", [])).prefill_backlog["a"][0] == 70


async def test_capacity_evicts_leaves_of_the_oldest_prompt_first(state: PlacementState) -> None:
    await record(state, "a", ["p1", "p2", "p3"], 4)
    await asyncio.sleep(0.002)  # a newer millisecond on Redis's clock
    await record(state, "a", ["q1", "q2"], 4)
    assert (await state.lookup("pool", ["p1", "p2", "p3"])).matched_blocks == {"a": 2}
    assert (await state.lookup("pool", ["q1", "q2"])).matched_blocks == {"a": 2}


async def test_a_checked_admission_refuses_an_endpoint_another_replica_took(state: PlacementState) -> None:
    seen = (await state.lookup("pool", [], leave_out="me")).inflight.get("a", 0)
    await record(state, "a", [], 100, replica="other")
    assert not await state.admit("pool", "me", [Option("a", 7, seen)], LEASE_MS)
    assert await state.admit("pool", "me", [Option("a", 7, seen + 1)], LEASE_MS)
    view = await state.lookup("pool", [], leave_out="me")
    assert view.inflight == {"a": 1}


async def test_an_admission_re_weighs_its_options_on_the_figures_of_that_instant(state: PlacementState) -> None:
    """The decision ranked a (9.2), b (9.15), c (9.0), none of them busy; then another replica took a (a request
    of 100 uncached blocks). Re-weighed at 0.125 a request and 0.01 a block, a falls to 8.075, so b, the first
    within the 0.1 margin of the best, is admitted with its own work; the prompt's writes (for a) are not."""
    weighing = Weighing(0.125, 0.01, 0.1, 8.0)
    options = [Option("a", 7, 0, 0, 9.2), Option("b", 5, 0, 0, 9.15), Option("c", 3, 0, 0, 9.0)]
    await record(state, "a", [], 100, work=100, replica="other")
    assert await state.admit("pool", "me", options, LEASE_MS, weighing=weighing,
                             after=[IndexWrite("a", ["x1"], 60_000, 100)]) == 2
    view = await state.lookup("pool", ["x1"])
    assert view.inflight == {"a": 1, "b": 1} and view.inflight_work == {"a": 100, "b": 5}
    assert view.matched_blocks == {}
    # Seen as they are now: the chosen one (first within the margin of the best) is admitted, with its writes.
    options = [Option("c", 3, 0, 0, 9.1), Option("b", 5, 0, 0, 9.15)]
    assert await state.admit("pool", "me", options, LEASE_MS, weighing=weighing,
                             after=[IndexWrite("c", ["x1"], 60_000, 100)]) == 1
    assert (await state.lookup("pool", ["x1"])).matched_blocks == {"c": 1}
    # Every option below the floor (a candidate left out of them may be best now): refused, nothing written.
    options = [Option("a", 7, 0, 0, 9.2), Option("b", 5, 0, 0, 9.0)]
    assert await state.admit("pool", "me", options, LEASE_MS, weighing=replace(weighing, floor=9.1)) == 0
    assert (await state.lookup("pool", [])).inflight == {"a": 1, "b": 1, "c": 1}


async def test_an_admission_re_weighs_on_the_replicas_own_requests_too(state: PlacementState) -> None:
    """Two decisions of one replica planned on the same view (a and b empty, a ranked first by a hair): the
    first is admitted at a; the second, re-weighed on the pool's figures, a's request included, takes b. Had
    the replica's own record been left out, both would have gone to a."""
    weighing = Weighing(0.125, 0.0, 0.0, NEVER_REFUSED)
    options = [Option("a", 0, 0, 0, 9.2), Option("b", 0, 0, 0, 9.15)]
    assert await state.admit("pool", "me", options, LEASE_MS, weighing=weighing) == 1
    assert await state.admit("pool", "me", options, LEASE_MS, weighing=weighing) == 2
    # A decision that saw both (a: 1, b: 1) keeps its choice.
    options = [Option("a", 0, 1, 0, 9.2), Option("b", 0, 1, 0, 9.15)]
    assert await state.admit("pool", "me", options, LEASE_MS, weighing=weighing) == 1
    assert (await state.lookup("pool", [])).inflight == {"a": 2, "b": 1}


async def test_publishing_replaces_a_replicas_record_whole(state: PlacementState) -> None:
    # Leftovers of admissions whose answers were lost: the replica's own figures overwrite them.
    for _ in range(3):
        await record(state, "a", [], 100, 5)
    await record(state, "b", [], 100, replica="other")
    await state.publish("pool", "r", LEASE_MS, {"a": 1, "a|work": 5, "c": 2})
    view = await state.lookup("pool", [])
    assert view.inflight == {"a": 1, "b": 1, "c": 2} and view.inflight_work == {"a": 5}
    await state.publish("pool", "r", LEASE_MS, {})
    view = await state.lookup("pool", [])
    assert view.inflight == {"b": 1}


async def test_a_replica_that_stops_publishing_stops_counting(state: PlacementState) -> None:
    await state.publish("pool", "dead", 200, {"a": 4})
    await state.publish("pool", "alive", LEASE_MS, {"a": 1})
    assert (await state.lookup("pool", [])).inflight == {"a": 5}
    await asyncio.sleep(0.3)
    await state.publish("pool", "alive", LEASE_MS, {"a": 1})
    view = await state.lookup("pool", [])
    assert view.inflight == {"a": 1}


async def test_writes_apply_in_order_in_one_call(state: PlacementState) -> None:
    assert await state.admit("pool", "r", [Option("a", 5)], LEASE_MS, model="m")
    evicted = await state.write("pool", [IndexWrite("a", ["h1", "h2", "h3"], 60_000, 2),
                                         ReleaseWrite("r", "a", 5, "m"), IndexWrite("b", ["h1"], 60_000, 10)])
    assert evicted == 1  # a holds 2 blocks at most: its deepest went
    view = await state.lookup("pool", ["h1", "h2", "h3"])
    assert view.matched_blocks == {"a": 2, "b": 1}
    assert view.inflight == view.inflight_work == view.inflight_models == {}
