"""The shared Redis state and the per-replica in-memory baseline answer alike for the same operations.

The baseline only differs in where it lives, so benchmarks comparing the two
measure sharing, not a different algorithm.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis

from gateway_state.store import SharedView, StateStore
from picker.local_state import LocalState


@dataclass
class StateUnderTest:
    record: Callable[..., Awaitable[None]]  # (endpoint, hashes, capacity, work=0)
    view: Callable[[Sequence[str]], Awaitable[SharedView]]
    release: Callable[..., Awaitable[None]]  # (endpoint, work=0)


@pytest.fixture(params=["redis", "local"])
async def state(request: pytest.FixtureRequest, redis_client: Redis) -> StateUnderTest:
    if request.param == "local":
        local = LocalState()

        async def record(endpoint: str, hashes: Sequence[str], capacity: int, work: int = 0) -> None:
            local.admit("pool", endpoint, work)
            local.index("pool", endpoint, hashes, capacity)

        async def view(hashes: Sequence[str]) -> SharedView:
            return local.view("pool", hashes)

        async def release(endpoint: str, work: int = 0) -> None:
            local.release("pool", endpoint, work)

        return StateUnderTest(record, view, release)
    store = StateStore(redis_client)
    clock = iter(range(10**6))

    def now() -> int:  # strictly increasing, so recency is unambiguous
        return int(time.time() * 1000) + next(clock)

    async def record_r(endpoint: str, hashes: Sequence[str], capacity: int, work: int = 0) -> None:
        await store.admit("pool", "r", endpoint, now(), 5_000, work)
        await store.index("pool", endpoint, hashes, now(), 60_000, capacity)

    async def view_r(hashes: Sequence[str]) -> SharedView:
        return await store.lookup("pool", hashes, now())

    async def release_r(endpoint: str, work: int = 0) -> None:
        await store.release("pool", "r", endpoint, work)

    return StateUnderTest(record_r, view_r, release_r)


async def test_longest_prefix_inflight_and_release(state: StateUnderTest) -> None:
    await state.record("a", ["1", "2", "3"], 100)
    await state.record("b", ["1", "x"], 100)
    view = await state.view(["1", "2", "3", "4"])
    assert view.matched_blocks == {"a": 3, "b": 1} and view.inflight == {"a": 1, "b": 1}
    await state.release("a")
    assert (await state.view([])).inflight == {"b": 1}


async def test_uncached_prompt_work_adds_up_apart_from_the_counts_and_releases(state: StateUnderTest) -> None:
    await state.record("a", [], 100, 250)
    await state.record("a", [], 100, 10)
    await state.record("b", [], 100)
    view = await state.view([])
    assert view.inflight == {"a": 2, "b": 1} and view.inflight_work == {"a": 260}
    await state.release("a", 250)
    view = await state.view([])
    assert view.inflight == {"a": 1, "b": 1} and view.inflight_work == {"a": 10}
    await state.release("a", 10)
    await state.release("b")
    view = await state.view([])
    assert view.inflight == {} and view.inflight_work == {}


async def test_capacity_evicts_leaves_of_the_oldest_prompt_first(state: StateUnderTest) -> None:
    await state.record("a", ["p1", "p2", "p3"], 4)
    await state.record("a", ["q1", "q2"], 4)
    assert (await state.view(["p1", "p2", "p3"])).matched_blocks == {"a": 2}
    assert (await state.view(["q1", "q2"])).matched_blocks == {"a": 2}
