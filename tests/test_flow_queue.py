"""Flow control's queue answers alike in Redis (shared by every replica) and in one replica's memory.

Order: priority first, then tenants in turn, FIFO within a tenant; a dispatch lets
through at most the room it is given, less the grants not yet admitted; tickets
past their deadline, or owned by a replica whose lease ended, are dropped.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import replace

import pytest
from redis.asyncio import Redis

from collector.collector import BATCH_LIMIT_KEEP_MS, with_batch_limit
from gateway_state import keys
from gateway_state.clock import FleetClock
from gateway_state.records import Config, Criticality, Endpoint, FlowControl, LoadSample, Model, Pool, TargetModel
from gateway_state.store import StateStore
from picker.director import Answer, Arrival, Director
from picker.flow_control import FlowController, MemoryQueue, Queue
from picker.hit_counts import HitCounts
from picker.intake import Intake
from picker.metrics import PickerMetrics
from picker.placement import Placement
from picker.roles import ProfileHandler
from picker.saturation import estimated_waiting, free_slots, has_room
from picker.scheduler import Scheduler, build_profiles
from picker.settings import PickerSettings, ServerSettings, StateSettings
from picker.snapshot import Snapshot, SnapshotSource
from picker.state import MemoryState
from picker.state_guard import StateGuard
from picker.writes import WriteBatcher
from tests.conftest import free_port

POOL = "ns/pool"
LEASE_MS = 5_000


@pytest.fixture(params=["redis", "memory"])
async def queue(request: pytest.FixtureRequest, redis_client: Redis) -> Queue:
    if request.param == "memory":
        return MemoryQueue()
    store = StateStore(redis_client)
    for replica in ("a", "b"):  # live replicas: the shared queue only lets live owners' tickets through
        await store.publish(POOL, replica, LEASE_MS, {})
    return store


async def take(queue: Queue, room: int, replica: str = "a") -> list[str]:
    granted, _ = await queue.dispatch(POOL, replica, room, 60_000)
    return [ticket for _, ticket in granted]


async def test_priority_first_then_tenants_in_turn_then_fifo(queue: Queue) -> None:
    names = {}
    for name, priority, tenant in [("s1", 0, "x"), ("s2", 0, "x"), ("s3", 0, "x"), ("t1", 0, "y"),
                                   ("c1", 1, "x"), ("u1", 0, "z"), ("t2", 0, "y"), ("sh", -1, "x"),
                                   ("c2", 5, "y")]:
        ticket = await queue.enqueue(POOL, "a", priority, tenant, 60_000, 100)
        assert ticket is not None
        names[ticket] = name
    order = [names[t] for t in await take(queue, 100)]
    # Priority 5, then 1, then the three tenants of priority 0 in turn (x, y, z, x, y, x), then -1.
    assert order == ["c2", "c1", "s1", "t1", "u1", "s2", "t2", "s3", "sh"]


async def test_a_tenant_arriving_later_takes_turns_instead_of_waiting_behind_a_backlog(queue: Queue) -> None:
    names = {}
    for i in range(6):
        names[await queue.enqueue(POOL, "a", 0, "big", 60_000, 100)] = f"big{i}"
    assert [names[t] for t in await take(queue, 2)] == ["big0", "big1"]
    for i in range(2):
        names[await queue.enqueue(POOL, "a", 0, "small", 60_000, 100)] = f"small{i}"
    assert [names[t] for t in await take(queue, 100)] == ["big2", "small0", "big3", "small1", "big4", "big5"]


async def test_room_is_shared_with_grants_not_yet_admitted(queue: Queue) -> None:
    tickets = [await queue.enqueue(POOL, "a", 0, "", 60_000, 100) for _ in range(5)]
    assert await take(queue, 2) == tickets[:2]
    assert await take(queue, 2) == []  # both grants still outstanding: the room they took is not free yet
    assert await queue.leave(POOL, tickets[0]) == "granted"  # admitted: its load shows in the next view
    assert await take(queue, 2) == tickets[2:3]
    assert await queue.leave(POOL, tickets[3]) == "waiting"  # its client went away
    assert await queue.leave(POOL, tickets[3]) == "gone"
    assert await queue.leave(POOL, tickets[1]) == "granted"
    assert await take(queue, 3) == tickets[4:5]


async def test_a_full_queue_refuses_and_expired_tickets_are_skipped(queue: Queue) -> None:
    short = await queue.enqueue(POOL, "a", 1, "", 20, 3)
    kept = await queue.enqueue(POOL, "a", 0, "", 60_000, 3)
    assert await queue.enqueue(POOL, "a", 0, "", 60_000, 3) is not None
    assert await queue.enqueue(POOL, "a", 0, "", 60_000, 3) is None
    await asyncio.sleep(0.05)
    granted, dropped = await queue.dispatch(POOL, "a", 1, 60_000)
    assert [t for _, t in granted] == [kept] and dropped == 1 and short != kept


async def test_a_dead_replicas_tickets_lose_nobody_else_their_place(redis_client: Redis) -> None:
    store = StateStore(redis_client)
    await store.publish(POOL, "alive", LEASE_MS, {})
    await store.publish(POOL, "dying", 100, {})  # its lease ends 100 ms from now, unrenewed
    dead = [await store.enqueue(POOL, "dying", 1, "", 60_000, 100) for _ in range(3)]
    first = await store.enqueue(POOL, "alive", 0, "", 60_000, 100)
    second = await store.enqueue(POOL, "alive", 0, "", 60_000, 100)
    await asyncio.sleep(0.15)
    granted, dropped = await store.dispatch(POOL, "alive", 1, 60_000)
    assert granted == [("alive", first)] and dropped == 3
    assert await store.ticket_states(POOL, [*dead, first, second]) == {
        **{t: "gone" for t in dead}, first: "granted", second: "waiting"}
    # A grant its owner never uses lapses, and its room goes to the next one.
    await store.publish(POOL, "dying", 100, {})
    late = await store.enqueue(POOL, "dying", 2, "", 60_000, 100)
    granted, _ = await store.dispatch(POOL, "alive", 2, 100)
    assert granted == [("dying", late)]
    await asyncio.sleep(0.15)
    assert await store.leave(POOL, first) == "granted"
    granted, _ = await store.dispatch(POOL, "alive", 1, 60_000)
    assert granted == [("alive", second)]
    assert not await redis_client.hlen(keys.queue_tickets(POOL)) - 1  # only the granted ticket's record is left


async def test_grants_reach_their_owner_by_pub_sub(redis_client: Redis) -> None:
    store = StateStore(redis_client)
    for replica in ("a", "b"):
        await store.publish(POOL, replica, LEASE_MS, {})
    heard: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    async def listen() -> None:
        async for grant in store.grants("b"):
            await heard.put(grant)

    listener = asyncio.create_task(listen())
    try:
        await asyncio.sleep(0.1)  # subscribed
        mine = await store.enqueue(POOL, "a", 0, "", 60_000, 10)
        theirs = await store.enqueue(POOL, "b", 0, "", 60_000, 10)
        granted, _ = await store.dispatch(POOL, "a", 2, 60_000)
        assert granted == [("a", mine), ("b", theirs)]
        assert await asyncio.wait_for(heard.get(), 2) == (POOL, theirs)
        assert heard.empty()  # the dispatching replica learns its own grants from the reply
    finally:
        listener.cancel()


class OneReplica:
    """One replica's flow control and placement over one endpoint that was running one request when
    scraped and is saturated at one waiting: it takes two at once."""

    def __init__(self, store: StateStore) -> None:
        settings = PickerSettings(server=ServerSettings(replica_id="me"), state=StateSettings(redis_timeout_ms=50))
        endpoint = Endpoint("pod-0", "10.0.0.1", 8000)
        pool = Pool("p", (8000,), endpoints=(endpoint,), flow=FlowControl(saturation_waiting=1))
        self.config = Config(1, {"p": pool}, {"p": {name: Model(name, "p", criticality, (TargetModel("m", 1),))
                                                      for name, criticality in (("c", Criticality.CRITICAL),
                                                                                ("s", Criticality.STANDARD))}})
        clock = FleetClock()
        self.metrics, rng = PickerMetrics(), random.Random(1)
        state, guard = MemoryState(), StateGuard(self.metrics, 50, settings.state.redis_backoff_ms)
        self.placement = Placement(state, None, Scheduler(build_profiles(settings.scheduling, rng)),
                                   settings, self.metrics, clock, guard, WriteBatcher(state, None, guard))
        self.snapshots = SnapshotSource(store, settings.state, clock)
        self.snapshots.current = Snapshot(self.config, {"p": {endpoint.key: LoadSample(clock.now_ms(), True,
                                                                                         running=1)}})
        self.flow = FlowController(store, self.placement, self.snapshots, settings, self.metrics,
                                   StateGuard(self.metrics, 50, settings.state.redis_backoff_ms, "queue-"))
        self.director = Director(self.snapshots, Intake(settings.prefix, 1 << 20, rng), ProfileHandler(rng),
                                 self.flow, self.placement, self.metrics, HitCounts())
        self.running: list[Answer] = []
        self.order: list[str] = []

    async def place(self, model: str) -> None:
        body = json.dumps({"model": model, "prompt": "hello"}).encode()
        answer = await self.director.decide(Arrival("p", "/v1/completions", body))
        self.order.append(model)
        self.running.append(answer)

    async def end_one(self) -> None:
        self.director.finish(self.running.pop(0))
        await asyncio.sleep(0.05)


async def test_with_redis_unreachable_a_replica_queues_in_its_own_memory_in_the_same_order() -> None:
    """A replica whose Redis is gone still holds requests back while its pool is saturated, and lets
    them through highest priority first as its own requests end."""
    replica = OneReplica(StateStore(Redis(port=free_port(), socket_connect_timeout=0.2)))
    for _ in range(2):
        await replica.place("s")
    waiting = [asyncio.create_task(replica.place("s")), asyncio.create_task(replica.place("s"))]
    await asyncio.sleep(0.1)
    waiting.append(asyncio.create_task(replica.place("c")))
    await asyncio.sleep(0.1)
    here = replica.flow.waiting_here()
    assert replica.order == ["s", "s"] and len(here) == 3 and all(w["queue"] == "local" for w in here)
    for _ in range(3):
        await replica.end_one()
    await asyncio.gather(*waiting)
    assert replica.order == ["s", "s", "c", "s", "s"]
    assert replica.metrics.flow_requests.labels("p", "1", "dispatched")._value.get() == 1


async def test_requests_waiting_in_redis_move_to_the_replica_when_redis_fails(redis_client: Redis) -> None:
    store = StateStore(redis_client)
    replica = OneReplica(store)
    await store.publish("p", "me", LEASE_MS, {})
    replica.snapshots.redis_ok = True
    for _ in range(2):
        await replica.place("s")
    waiting = [asyncio.create_task(replica.place("s")), asyncio.create_task(replica.place("c"))]
    await asyncio.sleep(0.1)
    assert [w["queue"] for w in replica.flow.waiting_here()] == ["fleet", "fleet"]
    assert await redis_client.zcard(keys.queue("p")) == 2
    replica.snapshots.redis_ok = False  # the last snapshot refresh could not reach Redis
    await replica.flow.tick()
    assert [w["queue"] for w in replica.flow.waiting_here()] == ["local", "local"]
    for _ in range(2):
        await replica.end_one()
    await asyncio.gather(*waiting)
    assert replica.order == ["s", "s", "c", "s"]
    replica.snapshots.redis_ok = True  # Redis answers again: the tickets left there go
    await replica.flow.poll()
    assert await redis_client.zcard(keys.queue("p")) == 0


def test_room_is_judged_on_the_requests_in_flight_not_only_the_last_scrape() -> None:
    flow = FlowControl()  # saturated at 5 waiting or KV 0.8; let through to a full server while none waits
    full = LoadSample(0, True, waiting=3, running=8, kv_cache_usage=0.5)
    # The scrape saw 8 running and 3 waiting; 2 of the gateway's 11 ended since: 1 waits now.
    assert estimated_waiting(full, 9) == 1 and has_room(full, 9, flow) and free_slots(full, 9, flow, 2) == 0
    # 3 ended: a batch slot is free, so one request may be let through (it starts at once).
    assert free_slots(full, 7, flow, 2) == 1 and free_slots(full, 4, flow, 2) == 4
    # 6 admitted since: the queue is building before any scrape shows it.
    assert estimated_waiting(full, 14) == 6 and not has_room(full, 14, flow)
    # Nothing of the gateway's there: the scraped queue (traffic from elsewhere) is all there is.
    assert estimated_waiting(full, 0) == 3
    # The collector noted 5 of the 11 as the gateway's: 6 came from elsewhere and stay. With 2 of the
    # gateway's now, 8 are there for 8 slots; with 7, 5 wait.
    mixed = replace(full, gateway_inflight=5)
    assert estimated_waiting(mixed, 2) == 0 and estimated_waiting(mixed, 7) == 5 and not has_room(mixed, 7, flow)
    assert estimated_waiting(replace(full, gateway_inflight=11), 9) == 1  # all the gateway's: as before
    assert not has_room(replace(full, kv_cache_usage=0.85), 7, flow)
    assert has_room(None, 100, flow) and free_slots(None, 100, flow, 2) == 2  # unknown load: room, gradually


async def test_the_reserve_is_kept_for_positive_priorities(queue: Queue) -> None:
    names = {}
    for name, priority in (("c", 1), ("s1", 0), ("s2", 0), ("d", -1)):
        names[await queue.enqueue(POOL, "a", priority, "", 60_000, 100)] = name
    granted, _ = await queue.dispatch(POOL, "a", 2, 60_000, 2)
    assert [names[t] for _, t in granted] == ["c"]  # one free beyond the reserve would have been needed
    for ticket, _ in [(t, n) for t, n in names.items() if n == "c"]:
        await queue.leave(POOL, ticket)
    granted, _ = await queue.dispatch(POOL, "a", 4, 60_000, 2)
    assert [names[t] for _, t in granted] == ["s1", "s2"]  # 4 free: two go, two stay for Critical
    enqueued = await queue.enqueue(POOL, "a", 3, "", 60_000, 100)
    granted, _ = await queue.dispatch(POOL, "a", 5, 60_000, 2)
    assert [t for _, t in granted] == [enqueued]  # 5 free, 2 granted outstanding: the reserve is Critical's


def test_a_server_seen_full_is_let_through_exactly_as_many_as_its_batch_holds() -> None:
    flow = FlowControl()
    # Last seen queueing at 8 running (the collector's batch limit); not queueing now.
    seen_full = LoadSample(0, True, waiting=0, running=8, kv_cache_usage=0.3, batch_limit=8)
    assert free_slots(seen_full, 8, flow, 2) == 0 and free_slots(seen_full, 5, flow, 2) == 3
    assert free_slots(seen_full, 8, replace(flow, release_waiting=1), 2) == 1
    # Full of traffic from elsewhere (nothing of the gateway's there): no room.
    assert free_slots(replace(seen_full, waiting=4), 0, flow, 2) == 0
    never_full = replace(seen_full, batch_limit=0)  # could run more: grows by the saturation queue
    assert free_slots(never_full, 8, flow, 2) == 5


def test_the_collector_keeps_the_batch_a_server_was_seen_full_at_for_a_while() -> None:
    queueing = with_batch_limit(LoadSample(1000, True, waiting=2, running=8), None)
    assert queueing.batch_limit == 8
    calm = with_batch_limit(LoadSample(1100, True, waiting=0, running=6), queueing)
    assert calm.batch_limit == 8
    grown = with_batch_limit(LoadSample(1200, True, waiting=0, running=12), calm)
    assert grown.batch_limit == 0  # it ran more than that without queueing: the limit is unknown again
    old = with_batch_limit(LoadSample(1000 + BATCH_LIMIT_KEEP_MS + 1, True, waiting=0, running=6), calm)
    assert old.batch_limit == 0
    # Waiting for a LoRA slot says nothing about the batch.
    lora = with_batch_limit(LoadSample(1000, True, waiting=3, running=1, waiting_adapters=("a",)), None)
    assert lora.batch_limit == 0
