"""The shared Redis state: prefix index, LRU capacity, in-flight counts and their leases, on a real Redis."""

from __future__ import annotations

import asyncio
import random
import time

from redis.asyncio import Redis

from gateway_state import keys
from gateway_state.records import (
    Config,
    Endpoint,
    LoadSample,
    Model,
    Objective,
    Pool,
    Strategy,
    TargetModel,
    decode_config,
    encode_config,
)
from gateway_state.store import StateStore
from tests.conftest import publish

LEASE_MS = 5000


def now_ms() -> int:
    return int(time.time() * 1000)


async def record(store: StateStore, endpoint: str, blocks: list[str], replica: str = "r1", capacity: int = 1000,
                 lease_ms: int = LEASE_MS) -> int:
    """What a picker writes for one routed request: its in-flight count, then its blocks in the index."""
    assert await store.admit("pool", replica, endpoint, lease_ms)
    return await store.index("pool", endpoint, blocks, 60_000, capacity)


async def test_lookup_finds_the_longest_cached_prefix_per_endpoint(redis_client: Redis) -> None:
    store = StateStore(redis_client)
    await record(store, "a:1", ["h1", "h2", "h3"])
    await record(store, "b:1", ["h1"])
    view = await store.lookup("pool", ["h1", "h2", "h3", "h4"])
    assert view.matched_blocks == {"a:1": 3, "b:1": 1}
    # The walk stops at the first block nobody holds.
    view = await store.lookup("pool", ["x0", "h1", "h2"])
    assert view.matched_blocks == {}


async def test_lookup_finds_each_endpoints_own_match_length_in_a_long_prompt(redis_client: Redis) -> None:
    # The lookup searches the prompt rather than walking it block by block; every
    # endpoint must still get exactly the length of the query prefix it holds,
    # whichever mix of lengths and diverging continuations the pool has.
    store = StateStore(redis_client)
    rng = random.Random(5)
    for trial in range(6):
        query = [f"t{trial}q{i}" for i in range(256)]
        expected = {}
        for n in range(8):
            endpoint = f"t{trial}e{n}:1"
            for _ in range(rng.randint(1, 3)):  # each endpoint served a few prompts sharing part of the query
                shared = rng.choice([0, 1, 2, 37, 128, 200, 255, 256, rng.randint(0, 256)])
                own = [f"{endpoint}-{shared}-{i}" for i in range(rng.randint(0, 20))]
                await record(store, endpoint, query[:shared] + own)
                if shared:
                    expected[endpoint] = max(expected.get(endpoint, 0), shared)
        assert (await store.lookup("pool", query)).matched_blocks == expected, trial


async def test_inflight_counts_add_up_over_replicas_and_release(redis_client: Redis) -> None:
    store = StateStore(redis_client)
    await asyncio.gather(*(record(store, "a:1", [], replica=f"r{i % 3}") for i in range(30)))
    assert (await store.lookup("pool", [])).inflight == {"a:1": 30}
    await asyncio.gather(*(store.release("pool", f"r{i % 3}", "a:1") for i in range(30)))
    assert (await store.lookup("pool", [])).inflight == {}
    # A release with no matching record (say after a flush) never drives the count negative.
    await store.release("pool", "r0", "a:1")
    await record(store, "a:1", [], replica="r0")
    assert (await store.lookup("pool", [])).inflight == {"a:1": 1}


async def test_requests_per_model_add_up_over_replicas_apart_from_the_endpoints_counts(redis_client: Redis) -> None:
    store = StateStore(redis_client)
    for i in range(4):
        assert await store.admit("pool", f"r{i % 2}", "a:1", LEASE_MS, model="sql-lora" if i else "base")
    view = await store.lookup("pool", [])
    assert view.inflight == {"a:1": 4} and view.inflight_models == {"a:1@sql-lora": 3, "a:1@base": 1}
    for i in range(4):
        await store.release("pool", f"r{i % 2}", "a:1", model="sql-lora" if i else "base")
    view = await store.lookup("pool", [])
    assert view.inflight == view.inflight_models == {}


async def test_a_dead_replicas_counts_stop_counting_when_its_lease_ends(redis_client: Redis) -> None:
    store = StateStore(redis_client)
    await record(store, "a:1", [], replica="dead", lease_ms=300)
    await record(store, "a:1", [], replica="alive")
    view = await store.lookup("pool", [])
    assert view.inflight == {"a:1": 2} and view.replicas == ("alive", "dead")
    await asyncio.sleep(0.4)
    await store.publish("pool", "alive", LEASE_MS, {"a:1": 1})
    view = await store.lookup("pool", [])
    assert view.inflight == {"a:1": 1} and view.replicas == ("alive",)
    assert not await redis_client.exists(keys.inflight("pool", "dead"))


async def test_endpoint_capacity_evicts_least_recent_blocks_leaves_first(redis_client: Redis) -> None:
    store = StateStore(redis_client)
    assert await record(store, "a:1", ["p1", "p2", "p3"], capacity=4) == 0
    await asyncio.sleep(0.002)
    # Two newer blocks: the LRU holds 4, so the deepest old block goes first.
    assert await record(store, "a:1", ["q1", "q2"], capacity=4) == 1
    view = await store.lookup("pool", ["p1", "p2", "p3"])
    assert view.matched_blocks == {"a:1": 2}
    # The scripts write exactly the keys the schema module names.
    assert await redis_client.zcard(keys.endpoint_lru("pool", "a:1")) == 4
    assert await redis_client.hkeys(keys.prefix_block("pool", "p1")) == [b"a:1"]
    assert not await redis_client.exists(keys.prefix_block("pool", "p3"))  # evicted, and no holder left
    # Another endpoint's entries are untouched by a's eviction.
    await record(store, "b:1", ["p1", "p2", "p3"], capacity=4)
    assert (await store.lookup("pool", ["p1", "p2", "p3"])).matched_blocks == {"a:1": 2, "b:1": 3}


async def test_config_and_load_round_trip(redis_client: Redis) -> None:
    store = StateStore(redis_client)
    pool = Pool("p", (8000,), Strategy.PREFIX_CACHE, endpoints=(Endpoint("pod-0", "10.0.0.1", 8000, {"app": "x"}),))
    config = Config(3, {"p": pool}, {"p": {"m": Model("m", "p", targets=(TargetModel("m", 1),))}}, prefix_seed=42,
                    objectives={"p": {"batch": Objective("batch", "p", -5)}})
    assert decode_config(encode_config(config)) == config
    await publish(store, config)
    sample = LoadSample(now_ms(), True, waiting=2, running=5, kv_cache_usage=0.4, running_adapters=("a",),
                        block_size=16, num_blocks=100)
    await store.write_load("p", {"10.0.0.1:8000": sample, "10.0.0.2:8000": sample})
    await store.prune_load("p", {"10.0.0.1:8000"})
    reply = await store.read_snapshot(["p"])
    assert reply.config is not None and decode_config(reply.config) == config
    assert reply.load == {"p": {"10.0.0.1:8000": sample}}
    assert abs(await store.now_ms() - now_ms()) < 1000


async def test_a_lookup_can_leave_out_its_own_replica(redis_client: Redis) -> None:
    store = StateStore(redis_client)
    await record(store, "a:1", [], replica="me")
    await record(store, "a:1", [], replica="other")
    await record(store, "b:1", [], replica="me")
    view = await store.lookup("pool", [], leave_out="me")
    assert view.inflight == {"a:1": 1} and view.replicas == ("me", "other")


async def test_a_checked_admission_refuses_an_endpoint_another_replica_took_meanwhile(redis_client: Redis) -> None:
    store = StateStore(redis_client)
    seen = (await store.lookup("pool", [], leave_out="me")).inflight.get("a:1", 0)
    await record(store, "a:1", [], replica="other")  # between this replica's lookup and its admission
    args = ("pool", "me", "a:1", LEASE_MS, 7)
    assert not await store.admit(*args, others_seen=seen)
    view = await store.lookup("pool", [])
    assert view.inflight == {"a:1": 1} and view.inflight_work == {}  # nothing written
    # Seen up to date (or no check): admitted.
    assert await store.admit(*args, others_seen=seen + 1)
    assert await store.admit(*args)
    view = await store.lookup("pool", [])
    assert view.inflight == {"a:1": 3} and view.inflight_work == {"a:1": 14}
