"""The placement part of the picker against the in-memory state (and a real Redis where it stalls):
conflicts, a failing state, release accounting, and requests cancelled or cut off in the middle of their
admission."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import pytest
import uvloop
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway_state.clock import FleetClock
from gateway_state.placement_store import IndexWrite, Option, ReleaseWrite, SharedView, Write, summed
from gateway_state.records import Config, Endpoint, LoadSample, Model, Pool, Strategy, TargetModel
from gateway_state.script_link import ScriptLink
from gateway_state.store import StateStore
from picker.candidates import pending_prefill, prefill_speeds
from picker.intake import Intake, PlacementRequest
from picker.metrics import PickerMetrics
from picker.placement import Placement
from picker.scheduler import Scheduler, build_profiles
from picker.settings import PickerSettings, ServerSettings, StateSettings
from picker.state import MemoryState, OwnRequests, PlacementState
from picker.state_guard import StateGuard
from picker.writes import LOOKUP_RELEASES, WriteBatcher, write_batches

ENDPOINTS = tuple(Endpoint(f"pod-{i}", f"10.0.0.{i}", 8000) for i in range(4))
CONFIG = Config(1, {"p": Pool("p", (8000,), Strategy.PREFIX_CACHE, endpoints=ENDPOINTS)},
                {"p": {"m": Model("m", "p", targets=(TargetModel("m", 1),))}}, prefix_seed=3)
SETTINGS = PickerSettings(server=ServerSettings(replica_id="me"), state=StateSettings(redis_timeout_ms=50))


def request(text: str = "shared system prompt " * 40, config: Config = CONFIG) -> PlacementRequest:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}).encode()
    return Intake(SETTINGS.prefix, 1 << 20, random.Random(1)).read(config, "p", "/v1/chat/completions", body)


def placement(state: PlacementState, fallback: MemoryState | None = None,
              settings: PickerSettings = SETTINGS) -> tuple[Placement, PickerMetrics]:
    metrics = PickerMetrics()
    rng = random.Random(2)
    guard = StateGuard(metrics, settings.state.redis_timeout_ms, settings.state.redis_backoff_ms)
    return Placement(state, fallback, Scheduler(build_profiles(settings.scheduling, rng)), settings, metrics,
                     FleetClock(), guard, WriteBatcher(state, fallback, guard)), metrics


class Interleaved(MemoryState):
    """Another replica takes every endpoint of this replica's first admission (four requests at each) just
    before it comes."""

    def __init__(self) -> None:
        super().__init__()
        self.rounds = 0
        self.first_options: list[str] = []

    async def lookup(self, pool: str, block_hashes: Sequence[str], leave_out: str = "",
                     speculative: bool = False, releases: Sequence[ReleaseWrite] = ()) -> SharedView:
        self.rounds += 1
        return await super().lookup(pool, block_hashes, leave_out, speculative, releases)

    async def admit(self, pool: str, replica: str, options: Sequence[Option], *args: Any, **kwargs: Any) -> int:
        if not self.first_options:
            self.first_options = [o.endpoint for o in options]
            for o in options * 4:
                await super().admit(pool, "other", [Option(o.endpoint)], 5_000)
        return await super().admit(pool, replica, options, *args, **kwargs)


class Down(MemoryState):
    calls = 0

    async def lookup(self, pool: str, block_hashes: Sequence[str], leave_out: str = "",
                     speculative: bool = False, releases: Sequence[ReleaseWrite] = ()) -> SharedView:
        self.calls += 1
        raise RedisConnectionError("Redis is down")

    async def admit(self, *args: object, **kwargs: object) -> bool:
        raise RedisConnectionError("Redis is down")

    async def index(self, *args: object, **kwargs: object) -> int:
        raise RedisConnectionError("Redis is down")


class Stalled(MemoryState):
    """Admits, then answers too late: the caller's deadline fires after the state counted it."""

    async def admit(self, *args: object, **kwargs: object) -> bool:
        admitted = await super().admit(*args, **kwargs)  # type: ignore[arg-type]
        await asyncio.sleep(0.2)
        return admitted


def test_the_shared_and_own_figures_add_up_as_counters_do() -> None:
    """Only positive sums are kept: a replica's record healed below zero, or a figure that went to zero, is no
    request in flight."""
    cases = [({}, {}), ({"a": 2, "b": 1}, {}), ({}, {"a": 1}), ({"a": 2, "b": -1, "c": 0}, {"b": 3, "d": 1, "a": -2}),
             ({"a": -1}, {"b": -1}), ({"a": 1, "b": 2}, {"a": 1, "b": -2})]
    for a, b in cases:
        assert summed(a, b) == dict(Counter(a) + Counter(b)), (a, b)


async def test_a_conflict_is_decided_again_on_fresh_figures() -> None:
    """Every endpoint the admission could take got four requests since the lookup, more than the one left
    out of them by far: refused, decided again, and placed where the other replica is not."""
    state = Interleaved()
    p, metrics = placement(state)
    placed = await p.place(request(), {})
    assert state.rounds == 2 and metrics.placement_conflicts.labels("p")._value.get() == 1
    key = placed.chosen.endpoint.key
    assert len(state.first_options) == 3 and key not in state.first_options
    assert (await state.lookup("p", [])).inflight[key] == 1  # ours alone
    assert p.own.figures("p") == {key: 1, key + "|work": 14, key + "@m": 1}  # request, its prompt, its model


class FilledAgain(StateStore):
    """Another replica takes the three best endpoints of each of this replica's admissions just before it
    comes: four requests at each for the first, eight for the second."""

    def __init__(self, redis: Redis | RedisCluster) -> None:
        super().__init__(redis)
        self.rounds: list[list[str]] = []

    async def admit(self, pool: str, replica: str, options: Sequence[Option], *args: Any, **kwargs: Any) -> int:
        self.rounds.append([o.endpoint for o in options])
        for o in list(options[:3]) * (4 if len(self.rounds) == 1 else 8):
            await super().admit(pool, "other", [Option(o.endpoint)], 5_000)
        return await super().admit(pool, replica, options, *args, **kwargs)


async def test_a_decision_made_again_weighs_every_endpoint_at_its_admission(
        shared_redis: Redis | RedisCluster) -> None:
    """Refused once (the first three endpoints were taken), the request is decided again on fresh figures, and
    the three best of that view are taken too before its admission: the admission weighs every endpoint, so
    it goes to one of the first three (four requests each) rather than the best of three at eight. The answer
    keeps the configured number of fallbacks."""
    six = tuple(Endpoint(f"pod-{i}", f"10.0.1.{i}", 8000) for i in range(6))
    config = replace(CONFIG, pools={"p": Pool("p", (8000,), Strategy.PREFIX_CACHE, endpoints=six)})
    state = FilledAgain(shared_redis)
    p, metrics = placement(state, MemoryState())
    placed = await p.place(request("again " * 40, config), {})
    first, second = state.rounds
    assert len(first) == 3 and len(second) == 6 and set(second[:3]).isdisjoint(first)
    assert placed.chosen.endpoint.key in first and metrics.placement_conflicts.labels("p")._value.get() == 1
    assert len(placed.endpoints) == SETTINGS.scheduling.fallbacks + 1


async def test_an_endpoint_taken_since_the_lookup_gives_way_to_the_next_in_the_same_round_trip(
        shared_redis: Redis | RedisCluster) -> None:
    """Another replica takes the chosen endpoint (a request and a long prompt) between this replica's lookup
    and its admission: the admission, re-weighed on the figures there now, takes the decision's next endpoint,
    with no second lookup. This replica's figures and the prompt's index entry follow it there."""
    store = StateStore(shared_redis)
    p, metrics = placement(store, MemoryState())
    mine = request("mine " * 30)
    plan = await p.plan(mine, {})
    chosen, runner_up = plan.decision.endpoints[0].endpoint.key, plan.decision.endpoints[1].endpoint.key
    assert await store.admit("p", "other", [Option(chosen, 400)], 5_000)
    placed = await p.commit(plan, time.perf_counter())
    assert placed is not None and placed.chosen.endpoint.key == runner_up and placed.admitted_shared
    assert metrics.placement_switches.labels("p")._value.get() == 1
    work = plan.options[1].work_blocks  # the whole prompt: nobody holds any of it
    assert work == mine.scheduling.work_blocks > 0
    assert p.own.figures("p") == {runner_up: 1, runner_up + "|work": work, runner_up + "@m": 1}
    await p.drain()
    view = await store.lookup("p", mine.block_hashes)
    assert view.inflight == {chosen: 1, runner_up: 1} and view.inflight_work == {chosen: 400, runner_up: work}
    assert view.matched_blocks == {runner_up: len(mine.block_hashes)}


@asynccontextmanager
async def linked(redis: Redis | RedisCluster) -> AsyncIterator[StateStore]:
    """The store as a picker builds it: on one Redis its request-path scripts go through the script link."""
    link = ScriptLink.for_client(redis)
    try:
        yield StateStore(redis, link)
    finally:
        if link is not None:
            link.close()


async def test_a_heartbeat_while_an_admission_is_under_way_keeps_the_record_it_would_miscount(
        shared_redis: Redis | RedisCluster) -> None:
    """The heartbeat comes while an admission is under way, and the admission then takes the decision's next
    endpoint: the record is kept, not replaced by figures that count the request where it was sent, so the
    pool's figures never count it twice or at the endpoint it did not go to. The next heartbeat, with nothing
    under way, replaces the record with the same figures."""
    async with linked(shared_redis) as store:
        p, _ = placement(store, MemoryState())
        plan = await p.plan(request("mine " * 30), {})
        chosen, runner_up = plan.decision.endpoints[0].endpoint.key, plan.decision.endpoints[1].endpoint.key
        assert await store.admit("p", "other", [Option(chosen, 400)], 5_000)
        committing = asyncio.ensure_future(p.commit(plan, time.perf_counter()))
        while not p.own.figures("p"):  # its admission is sent
            await asyncio.sleep(0)
        await p.publish(["p"])
        placed = await committing
        assert placed is not None and placed.chosen.endpoint.key == runner_up
        assert (await store.lookup("p", [])).inflight == {chosen: 1, runner_up: 1}
        await p.publish(["p"])
        assert (await store.lookup("p", [])).inflight == {chosen: 1, runner_up: 1}
        assert (await store.lookup("p", [], leave_out="other")).inflight == {runner_up: 1}


async def test_a_heartbeat_drops_the_releases_its_record_already_leaves_out(
        shared_redis: Redis | RedisCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two requests at a pool's one endpoint, one ended and its release still gathered when the heartbeat
    replaces the record: the record counts the other, and the release is not applied after it as well."""
    monkeypatch.setattr("picker.writes.LINGER_S", 5.0)
    one = replace(CONFIG, pools={"p": Pool("p", (8000,), Strategy.PREFIX_CACHE, endpoints=ENDPOINTS[:1])})
    async with linked(shared_redis) as store:
        p, _ = placement(store)
        placed = [await p.place(request(text, one), {}) for text in ("first " * 30, "second " * 30)]
        key = ENDPOINTS[0].key
        assert (await store.lookup("p", [])).inflight == {key: 2}
        p.release(placed[0])
        await p.publish(["p"])
        await p.drain()
        await asyncio.sleep(0.05)
        assert (await store.lookup("p", [])).inflight == {key: 1}


async def test_release_takes_back_exactly_what_was_admitted() -> None:
    state = MemoryState()
    p, _ = placement(state)
    placed = [await p.place(request(f"prompt {i} " * 30), {}) for i in range(8)]
    assert sum((await state.lookup("p", [])).inflight.values()) == 8 and p.own.total("p") == 8
    for one in placed:
        p.release(one)
    await p.drain()
    view = await state.lookup("p", [])
    assert view.inflight == view.inflight_work == view.inflight_models == {} and p.own.figures("p") == {}


class SlowWrites(MemoryState):
    """Each call of writes takes 20 ms, as a round trip under load might: the batches it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    async def write(self, pool: str, writes: Sequence[Write]) -> int:
        self.batches.append(len(writes))
        await asyncio.sleep(0.02)
        return await super().write(pool, writes)


async def test_the_writes_after_decisions_share_a_round_trip_while_one_is_under_way() -> None:
    state = SlowWrites()
    p, _ = placement(state)
    placed = [await p.place(request(f"prompt {i} " * 30), {}) for i in range(12)]
    assert state.batches == []  # each prompt's index write rode on its admission
    for one in placed[:6]:
        p.release(one)
    await asyncio.sleep(0.005)  # past the linger: the first release goes alone, the rest gather behind it
    for one in placed[6:]:
        p.release(one)
    await p.drain()
    assert sum(state.batches) == 12 and len(state.batches) <= 3, state.batches
    view = await state.lookup("p", [])
    assert view.inflight == {} and len(state.matched("p", request("prompt 3 " * 30).block_hashes)) == 1


PATIENT = replace(SETTINGS, state=replace(SETTINGS.state, redis_timeout_ms=1_000, admission_timeout_ms=5_000))


class Paced(StateStore):
    """A real Redis whose admissions are answered the given times late in turn (the last for the rest): each goes
    to Redis when sent, so Redis sees them in the order they were sent. Each write call takes 5 ms more. The calls
    in the order they ended, and the write calls sent while an admission was under way."""

    def __init__(self, redis: Redis | RedisCluster, *admit_s: float) -> None:
        super().__init__(redis)
        self.admit_s = list(admit_s)
        self.calls: list[tuple[str, int]] = []  # ("admit", options) or ("write", index writes)
        self.admitting = 0
        self.writes_beside_admissions = 0

    async def admit(self, *args: Any, **kwargs: Any) -> int:  # type: ignore[override]
        late_s = self.admit_s.pop(0) if len(self.admit_s) > 1 else self.admit_s[0]
        self.admitting += 1
        try:
            admitted = await super().admit(*args, **kwargs)
            await asyncio.sleep(late_s)
        finally:
            self.admitting -= 1
        self.calls.append(("admit", len(args[2])))
        return admitted

    async def write(self, pool: str, writes: Sequence[Write]) -> int:
        self.writes_beside_admissions += self.admitting > 0
        await asyncio.sleep(0.005)
        self.calls.append(("write", sum(isinstance(w, IndexWrite) for w in writes)))
        return await super().write(pool, writes)


async def test_a_bursts_index_writes_wait_for_its_admissions_then_go_together(
        shared_redis: Redis | RedisCluster) -> None:
    """Six decisions at once: the first's index write rides on its admission (none was under way), the others'
    wait until no admission is under way and then go in one call; every prompt is indexed. On a cluster no index
    write rides, and the calls of one replica reach the shards in no fixed order, so an admission may be refused
    and its decision made again after the others: there no write goes while an admission is under way."""
    state = Paced(shared_redis, 0.03)
    # Admissions answered well inside their deadline on a loaded machine too (a late one is settled by a call more).
    p, _ = placement(state, settings=PATIENT)
    prompts = [request(f"burst {i} " * 30) for i in range(6)]
    placed = await asyncio.gather(*(p.place(r, {}) for r in prompts))
    await asyncio.sleep(0.05)
    await p.drain()
    if state.index_rides_admission:
        assert state.calls == [("admit", 3)] * 6 + [("write", 5)], state.calls
    assert state.writes_beside_admissions == 0 and state.calls[-1][0] == "write", state.calls
    for r, one in zip(prompts, placed, strict=True):
        assert (await state.lookup("p", r.block_hashes)).matched_blocks == {
            one.chosen.endpoint.key: len(r.block_hashes)}


async def test_index_writes_wait_for_a_slow_admission_a_bounded_time(
        shared_redis: Redis | RedisCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """An admission far slower to answer than the one decided after it holds the second's index write back
    INDEX_HOLD_S at most: the write goes while the slow one is still under way."""
    monkeypatch.setattr("picker.writes.INDEX_HOLD_S", 0.05)
    state = Paced(shared_redis, 0.4, 0.01)
    p, _ = placement(state, settings=PATIENT)
    slow = asyncio.ensure_future(p.place(request("slow " * 30), {}))
    while not p.own.figures("p"):  # its admission is sent
        await asyncio.sleep(0)
    await p.place(request("fast " * 30), {})
    await asyncio.sleep(0.2)
    assert state.calls == [("admit", 3), ("write", 1)] and not slow.done()
    await slow
    await p.drain()


async def test_an_admission_carries_the_writes_gathered_before_it() -> None:
    """An index write left to the batcher (as when its admission's answer was lost) rides on the next
    admission, and the release gathered beside it on the next lookup: no call of their own."""
    state = SlowWrites()
    p, _ = placement(state)
    first = await p.place(request("first " * 30), {})
    left = request("left " * 30).block_hashes
    p._writes.add("p", IndexWrite("10.0.0.3:8000", left, 60_000, 1_000))
    p.release(first)
    second = await p.place(request("second " * 30), {})  # within the linger
    await asyncio.sleep(0.01)
    assert state.batches == []
    assert (await state.lookup("p", [])).inflight == {second.chosen.endpoint.key: 1}
    assert state.matched("p", left) == {"10.0.0.3:8000": len(left)}


async def test_a_lookup_carries_the_releases_gathered_before_it(shared_redis: Redis | RedisCluster,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A request ends and the next decision's lookup comes within the linger (a long one here, so nothing
    else can send it): the release rides on the lookup, in the same round trip (on a cluster, the pool's
    part), and no call of its own is left to make."""
    monkeypatch.setattr("picker.writes.LINGER_S", 5.0)
    store = StateStore(shared_redis)
    p, metrics = placement(store)
    first = await p.place(request("first " * 30), {})
    assert (await store.lookup("p", [])).inflight == {first.chosen.endpoint.key: 1}
    p.release(first)
    await p.plan(request("first " * 30), {})
    assert (await store.lookup("p", [])).inflight == {}
    await p.drain()  # on a cluster the first prompt's index write, which never rides a lookup, goes now
    assert observed(metrics, "write")[0] == (0 if store.index_rides_admission else 1)
    assert observed(metrics, "lookup")[0] == 2


async def test_without_the_state_it_places_from_its_own_figures_and_index() -> None:
    fallback, down = MemoryState(), Down()
    p, metrics = placement(down, fallback)
    first = await p.place(request(), {})
    await p.drain()  # the index write, into the fallback index as well
    second = await p.place(request(), {})
    assert not first.admitted_shared and second.chosen.endpoint == first.chosen.endpoint
    assert second.chosen.matched_blocks == len(request().block_hashes)
    assert metrics.redis_fallbacks.labels("lookup")._value.get() == 2
    assert down.calls == 1  # after a failure the request path leaves the state alone for a moment
    assert p.own.total("p") == 2
    p.release(first)
    p.release(second)
    assert p.own.figures("p") == {}


def observed(metrics: PickerMetrics, op: str) -> tuple[float, float]:
    """How many calls of `op` the guard timed, and their total seconds."""
    samples = {s.name: s.value for m in metrics.redis_call_seconds.collect() for s in m.samples
               if s.labels.get("op") == op}
    return samples.get("picker_redis_call_seconds_count", 0.0), samples.get("picker_redis_call_seconds_sum", 0.0)


def fallbacks(metrics: PickerMetrics) -> float:
    return sum(child._value.get() for child in metrics.redis_fallbacks._metrics.values())


async def test_each_request_path_redis_call_is_timed(shared_redis: Redis | RedisCluster) -> None:
    p, metrics = placement(StateStore(shared_redis))
    for _ in range(3):
        p.release(await p.place(request(), {}))
    for op in ("lookup", "admit"):
        count, seconds = observed(metrics, op)
        assert count == 3 and 0 < seconds < 3 * 0.05  # answered, each within its deadline
    await p.drain()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_loop_busy_past_the_deadline_is_not_taken_for_a_stalled_redis(
        shared_redis: Redis | RedisCluster, loop_kind: str) -> None:
    """A burst's start: Redis answers at once, but other requests' work keeps the event loop busy for twice
    the deadline (50 ms), so the reply is read late. The call gets the loop's lateness back: the request is
    admitted through the state, and the state stays in use for the next one (no back-off)."""
    if isinstance(shared_redis, RedisCluster):
        url = f"redis://{shared_redis.get_default_node().host}:{shared_redis.get_default_node().port}"
        connect = lambda: RedisCluster.from_url(url)  # noqa: E731
    else:
        kw = shared_redis.connection_pool.connection_kwargs
        connect = lambda: Redis(host=kw["host"], port=kw["port"])  # noqa: E731

    async def burst() -> tuple[bool, bool, float]:
        client = connect()
        try:
            store = StateStore(client)
            # Connected and the scripts loaded first, with time to spare (a cluster client's first calls learn
            # the slots and open a connection per shard), by a replica of its own: only the burst is measured.
            warm, _ = placement(store, settings=PATIENT)
            warm.release(await warm.place(request(), {}))
            await warm.drain()
            p, metrics = placement(store)

            async def other_requests() -> None:
                await asyncio.sleep(0)  # once the lookup is on its way
                time.sleep(0.1)

            busy = asyncio.create_task(other_requests())
            first = await p.place(request(), {})
            await busy
            second = await p.place(request(), {})
            await p.drain()
            return first.admitted_shared, second.admitted_shared, fallbacks(metrics)
        finally:
            await client.aclose()

    runner = asyncio.Runner(loop_factory=uvloop.new_event_loop if loop_kind == "uvloop" else None)
    with runner:
        assert runner.run(burst()) == (True, True, 0)


async def test_a_call_past_its_deadline_while_redis_answers_others_leaves_the_state_in_use(
        shared_redis: Redis | RedisCluster) -> None:
    """Redis keeps one call waiting past its 50 ms deadline (a BLPOP of 0.3 s) while it answers another: it is
    busy, not stalled, so only that call falls back. Calls missed one after another with no answer for five
    deadlines (a stall, as this replica sees it) back off, and the next answer of a call made meanwhile (writes
    are tried in the back-off) ends it."""
    guard = StateGuard(PickerMetrics(), 50, 250)
    missed, answered = await asyncio.gather(guard.call("lookup", shared_redis.blpop(["nothing-comes"], 0.3)),
                                            guard.call("admit", shared_redis.ping()))
    assert missed is None and answered is True and guard.usable
    misses = 0
    while guard.usable and misses < 10:
        assert await guard.call("lookup", shared_redis.blpop(["nothing-comes"], 0.3)) is None
        misses += 1
    assert 4 <= misses <= 5 and not guard.usable  # silent for 250 ms: at the fifth miss, or the fourth if late
    assert await guard.call("write", shared_redis.ping(), in_backoff=True) is True
    assert guard.usable


@asynccontextmanager
async def redis_nodes(shared_redis: Redis | RedisCluster) -> AsyncIterator[list[Redis]]:
    """A connection to every node of `shared_redis`, open before the test's timed part begins, so that a slow
    connect on a loaded machine cannot fall inside it."""
    if isinstance(shared_redis, RedisCluster):
        nodes = [Redis(host=n.host, port=n.port) for n in shared_redis.get_nodes()]
    else:
        kw = shared_redis.connection_pool.connection_kwargs
        nodes = [Redis(host=kw["host"], port=kw["port"])]
    try:
        await asyncio.gather(*(n.ping() for n in nodes))
        yield nodes
    finally:
        for n in nodes:
            await n.aclose()


@asynccontextmanager
async def asleep(nodes: list[Redis], seconds: float) -> AsyncIterator[None]:
    """Every node answers nothing for `seconds` from the block's start (the sleep leaves in one write on each
    open connection); the block's end waits until they answer again."""
    stall = asyncio.gather(*(n.execute_command("DEBUG", "SLEEP", str(seconds)) for n in nodes))
    await asyncio.sleep(0.02)  # every node is asleep
    yield
    await stall


async def test_a_prompt_placed_while_redis_stalls_still_reaches_the_shared_index(
        shared_redis: Redis | RedisCluster) -> None:
    """Redis answers nothing for 0.3 s: the lookup misses its deadline, and so does the admission after it
    (one miss is not taken for a stall, so the admission is tried). The request still goes to its endpoint,
    so its index write is tried all the same, off the path, and lands once Redis answers (on a cluster, where
    the write does not ride on the admission, as on one Redis)."""
    store = StateStore(shared_redis)
    p, metrics = placement(store, MemoryState())
    async with redis_nodes(shared_redis) as nodes, asleep(nodes, 0.3):
        placed = await p.place(request(), {})
        assert not placed.admitted_shared and fallbacks(metrics) == 2  # the lookup's and the admission's
        # The wait is on record: the whole deadline (50 ms), in the lookup's histogram.
        assert observed(metrics, "lookup") == (1, pytest.approx(0.05, abs=0.04))
    await asyncio.sleep(0.05)
    await p.drain()
    view = await store.lookup("p", request().block_hashes)
    assert view.matched_blocks == {placed.chosen.endpoint.key: len(request().block_hashes)}


async def test_a_lookup_left_unanswered_reads_the_others_figures_of_the_last_answered_one(
        shared_redis: Redis | RedisCluster) -> None:
    """Redis answers nothing for 0.6 s. A lookup that misses its deadline reads the other replicas' figures
    from the pool's last answered lookup while that is at most `recent_view_ms` (150 ms) old, so this replica
    keeps off the endpoints the others just took; older, it has only its own figures."""
    store = StateStore(shared_redis)
    me, metrics = placement(store, MemoryState(), replace(SETTINGS, state=replace(SETTINGS.state, recent_view_ms=150)))
    mine = request("mine " * 30)
    alone = (await placement(MemoryState())[0].plan(mine, {})).chosen.endpoint.key  # seeing only its own figures
    # Another replica has six requests in flight at three endpoints (more than the prompt's home is worth, and
    # past the tie margin: three would not be), the one chosen alone among them.
    free = next(e.key for e in ENDPOINTS if e.key != alone)
    for e in [e for e in ENDPOINTS if e.key != free] * 6:
        assert await store.admit("p", "other", [Option(e.key)], 5_000)
    async with redis_nodes(shared_redis) as nodes:  # connected first: the lookups below are 70 ms apart
        assert (await me.plan(mine, {})).chosen.endpoint.key == free  # answered: the other's requests in view
        async with asleep(nodes, 0.6):
            assert (await me.plan(mine, {})).chosen.endpoint.key == free
            assert metrics.redis_fallbacks.labels("lookup")._value.get() == 1
            await asyncio.sleep(0.2)  # the last answered lookup is past 150 ms old now
            assert (await me.plan(mine, {})).chosen.endpoint.key == alone
            assert metrics.redis_fallbacks.labels("lookup")._value.get() == 2


async def test_a_request_cancelled_during_admission_leaves_no_count() -> None:
    gate = asyncio.Event()

    class Blocking(MemoryState):
        async def admit(self, *args: object, **kwargs: object) -> bool:
            await gate.wait()
            return True

    p, _ = placement(Blocking())
    task = asyncio.create_task(p.place(request(), {}))
    await asyncio.sleep(0.01)
    assert p.own.total("p") == 1  # counted here before the state answers
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert p.own.figures("p") == {}


async def test_an_admission_answered_past_its_deadline_is_released_when_its_request_ends() -> None:
    """The state counted it where it went, after the deadline: the answer, when it comes, makes the request's
    release the state's as well, so nothing is left behind for the heartbeat to heal."""
    state = Stalled()
    p, metrics = placement(state)
    placed = await p.place(request(), {})
    assert not placed.admitted_shared and metrics.redis_fallbacks.labels("admit")._value.get() == 1
    await asyncio.sleep(0.3)  # the state counted it after all
    assert (await state.lookup("p", [])).inflight == {placed.chosen.endpoint.key: 1}
    assert metrics.late_admissions.labels("p", "as_sent")._value.get() == 1
    p.release(placed)
    await p.drain()
    assert (await state.lookup("p", [])).inflight == {}


async def test_the_guards_drain_waits_for_work_that_work_under_way_starts() -> None:
    """A late admission's answer gathers a release, whose write goes in a task of its own when the batcher's
    timer fires: shutdown's drain waits for that one too, not only for what was under way when it began."""
    guard = StateGuard(PickerMetrics(), 50, 100)
    done: list[str] = []

    async def write() -> None:
        await asyncio.sleep(0.05)
        done.append("write")

    async def settle() -> None:
        await asyncio.sleep(0.01)
        asyncio.get_running_loop().call_soon(guard.later, write())
        await asyncio.sleep(0.01)
        done.append("settle")

    guard.later(settle())
    await guard.drain()
    assert done == ["settle", "write"]


async def test_releases_gathered_while_the_state_is_left_alone_are_not_lost() -> None:
    """A call failed a moment ago, so the next decision asks the state nothing: neither its lookup nor its
    admission takes the releases waiting for a call to ride on, and those go on their own, at once."""
    state = MemoryState()
    p, metrics = placement(state)
    first = await p.place(request("first " * 30), {})
    assert first.admitted_shared
    p.release(first)  # gathered, waiting a moment for a call to carry it
    p._guard.failed("lookup", RedisConnectionError("Redis is down"))
    assert not p._guard.usable
    second = await p.place(request("second " * 30), {})
    assert not second.admitted_shared and metrics.redis_fallbacks.labels("admit")._value.get() == 1
    await asyncio.sleep(0.05)
    assert (await state.lookup("p", [])).inflight == {}  # the first request's release reached the state


@pytest.mark.parametrize("ends_first", [False, True])
async def test_a_late_admission_that_took_another_endpoint_is_moved_where_the_request_went(
        shared_redis: Redis | RedisCluster, ends_first: bool) -> None:
    """Another replica takes the chosen endpoint after the lookup, and Redis stalls past the admission's
    deadline: the request goes to the decision's choice, while Redis, when it wakes, re-weighs and counts it
    at the runner-up. When that answer comes the count is moved to where the request went (or, if the
    request ended meanwhile, taken back), so the other replicas' views are right before any heartbeat."""
    store = StateStore(shared_redis)
    p, metrics = placement(store, MemoryState())
    mine = request("mine " * 30)
    plan = await p.plan(mine, {})
    chosen = plan.decision.endpoints[0].endpoint.key
    assert await store.admit("p", "other", [Option(chosen, 400)], 5_000)
    async with redis_nodes(shared_redis) as nodes:
        async with asleep(nodes, 0.2):
            placed = await p.commit(plan, time.perf_counter())
            assert placed is not None and placed.chosen.endpoint.key == chosen and not placed.admitted_shared
            if ends_first:
                p.release(placed)
        await p.drain()  # the late answer, and what it set right
    outcome = "ended" if ends_first else "moved"
    assert metrics.late_admissions.labels("p", outcome)._value.get() == 1
    work = plan.options[0].work_blocks
    assert (await store.inflight_by_replica("p", ["me"]))["me"] == ({} if ends_first else {chosen: 1})
    view = await store.lookup("p", [])
    assert view.inflight == {chosen: 1 if ends_first else 2}
    assert view.inflight_work == {chosen: 400 if ends_first else 400 + work}
    if not ends_first:
        p.release(placed)
        await p.drain()
        assert (await store.lookup("p", [])).inflight == {chosen: 1}  # the other replica's alone


def test_a_burst_of_writes_is_cut_into_calls_of_bounded_lua_work() -> None:
    index = IndexWrite("e", [f"h{i}" for i in range(100)], 60_000, 1_000)
    writes: list[Write] = [index, index, ReleaseWrite("me", "e"), index, IndexWrite("e", ["x"] * 400, 60_000, 1_000)]
    batches = write_batches(writes)
    assert [len(b) for b in batches] == [3, 1, 1]  # 201, then 100, then one alone past the bound
    assert [w for b in batches for w in b] == writes


async def test_a_lookup_takes_a_bounded_share_of_the_releases_and_leaves_the_rest_in_order() -> None:
    batcher = WriteBatcher(MemoryState(), None, StateGuard(PickerMetrics(), 50, 100))
    index = IndexWrite("e", ["h"], 60_000, 1_000)
    releases = [ReleaseWrite("me", f"e{i}") for i in range(LOOKUP_RELEASES + 4)]
    for w in [releases[0], index, *releases[1:]]:
        batcher.add("p", w)
    assert batcher.take_releases("p") == releases[:LOOKUP_RELEASES]
    assert batcher.take("p") == [index, *releases[LOOKUP_RELEASES:]]
    assert batcher.take_releases("p") == []


def test_an_endpoint_not_measured_yet_takes_the_slowest_measured_speed_of_its_pool() -> None:
    pool = CONFIG.pools["p"]
    samples = {ENDPOINTS[0].key: LoadSample(0, True, prefill_tokens_per_s=32_000),
               ENDPOINTS[1].key: LoadSample(0, True, prefill_tokens_per_s=16_000),
               ENDPOINTS[2].key: LoadSample(0, True)}
    assert prefill_speeds(pool, samples, 16.0, 1600.0) == {ENDPOINTS[0].key: 2000.0, ENDPOINTS[1].key: 1000.0,
                                                   ENDPOINTS[2].key: 1000.0, ENDPOINTS[3].key: 1000.0}
    assert set(prefill_speeds(pool, {}, 16.0, 1600.0).values()) == {100.0}  # none measured: the prior
    assert set(prefill_speeds(pool, {}, 16.0, 0.0).values()) == {0.0}  # no prior: unknown


def test_pending_prefill_is_the_work_in_flight_less_what_drained_at_the_endpoints_speed() -> None:
    view = SharedView({"a": 2, "b": 1, "c": 1}, {}, {"a": 300, "b": 100, "c": 50},
                      prefill_backlog={"a": (300.0, 100), "b": (100.0, 500)})
    assert pending_prefill(view, "a", 1000.0) == 200.0  # 100 of 300 drained in 100 ms
    assert pending_prefill(view, "b", 1000.0) == 0.0  # done, though its request is still in flight
    assert pending_prefill(view, "a", 0.0) == 300.0  # unknown speed: all of the work in flight
    assert pending_prefill(view, "c", 1000.0) == 50.0  # no backlog recorded (the state was flushed)
    # Never more than the work in flight: a request that ended takes its blocks with it.
    assert pending_prefill(replace(view, inflight_work={"a": 40}), "a", 1000.0) == 40.0


def test_own_admissions_a_lookup_did_not_see_count_in_the_prefill_ahead() -> None:
    """Requests of one burst look up at once: the backlog each lookup read holds none of what this replica
    admits while they wait, so that work is added to the drained backlog, never cut off by it."""
    own = OwnRequests()
    own.add("p", "a", 120)
    mark = own.mark()  # a lookup sent now reads a backlog that holds the first admission
    own.add("p", "a", 150)
    own.add("p", "b", 90)
    own.remove("p", "b", 60, refused=own.add("p", "b", 60))  # refused by the state: no work
    own.add("q", "a", 500)  # another pool
    assert own.work_since("p", mark) == {"a": 150, "b": 90}
    assert own.work_since("p", own.mark()) == {}
    view = SharedView({"a": 2}, {}, {"a": 270}, prefill_backlog={"a": (120.0, 60)},
                      unrecorded_work=own.work_since("p", mark))
    assert pending_prefill(view, "a", 1000.0) == 210.0  # 60 of the recorded 120 drained, plus 150 since
    assert pending_prefill(replace(view, unrecorded_work={}), "a", 1000.0) == 60.0


async def test_a_cold_prompt_goes_where_the_prefill_is_done_though_its_request_is_still_in_flight() -> None:
    """Every endpoint has a cold prompt in flight; pod-0's came first and, at the speed its collector
    measured, is computed by now: the next cold prompt goes there, whatever its prefix home."""
    state = MemoryState()
    p, _ = placement(state)
    now = FleetClock().now_ms()
    samples = {e.key: LoadSample(now, True, prefill_tokens_per_s=64_000) for e in ENDPOINTS}  # 4,000 blocks/s
    await state.admit("p", "other", [Option(ENDPOINTS[0].key, 400, blocks_per_s=4000.0)], 5_000)
    await asyncio.sleep(0.15)
    for e in ENDPOINTS[1:]:
        await state.admit("p", "other", [Option(e.key, 400, blocks_per_s=4000.0)], 5_000)
    chosen = {(await p.plan(request(f"cold prompt {i} " * 60), samples)).chosen.endpoint.key for i in range(6)}
    assert chosen == {ENDPOINTS[0].key}
    # Of unknown speed (no prior), the endpoints' backlogs look alike (400 blocks each): the prompts spread
    # by prefix home.
    p, _ = placement(state, settings=replace(SETTINGS, scheduling=replace(SETTINGS.scheduling,
                                                                          prefill_tokens_per_s_prior=0.0)))
    unmeasured = {e.key: LoadSample(now, True) for e in ENDPOINTS}
    assert len({(await p.plan(request(f"cold prompt {i} " * 60), unmeasured)).chosen.endpoint.key
                for i in range(6)}) > 1


async def test_the_prefill_speeds_follow_each_new_snapshot() -> None:
    """The speeds are worked out once per snapshot's samples: the next snapshot's measurements, in a new
    samples mapping as the snapshot source makes them, are the ones the admission's options carry."""
    p, _ = placement(MemoryState())
    now = FleetClock().now_ms()
    first = {e.key: LoadSample(now, True, prefill_tokens_per_s=16_000) for e in ENDPOINTS}
    assert {o.blocks_per_s for o in (await p.plan(request(), first)).options} == {1000.0}
    assert {o.blocks_per_s for o in (await p.plan(request(), first)).options} == {1000.0}
    second = {e.key: LoadSample(now, True, prefill_tokens_per_s=32_000) for e in ENDPOINTS}
    assert {o.blocks_per_s for o in (await p.plan(request(), second)).options} == {2000.0}


async def test_a_request_let_through_the_queue_never_lands_on_a_drained_endpoint_alone() -> None:
    """Let through flow control's queue, a request goes where it can start now; the drained endpoint (whose
    slots stay free) is no such place, or it alone would pass that rule and the drain filter would leave
    nothing (a 503 seen once under load)."""
    p, _ = placement(MemoryState())
    busy = {e.key: LoadSample(FleetClock().now_ms(), True, running=8, waiting=3, gateway_inflight=0)
            for e in ENDPOINTS[1:]}
    drained = frozenset({ENDPOINTS[0].key})
    placed = await p.place(request(), busy, drained, released=True)
    assert placed.chosen.endpoint.key != ENDPOINTS[0].key
