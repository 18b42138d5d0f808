"""The shared Redis state: prefix index, LRU capacity, in-flight counts and their leases, on a real Redis."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from redis.asyncio import Redis

from gateway_state import keys
from gateway_state.placement_store import Option
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
    assert await store.admit("pool", replica, [Option(endpoint)], lease_ms)
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


@pytest.mark.parametrize("one_width", [True, False], ids=["hashes-of-one-width", "hashes-of-many-widths"])
async def test_lookup_finds_each_endpoints_own_match_length_in_a_long_prompt(redis_client: Redis,
                                                                             one_width: bool) -> None:
    # The lookup searches the prompt rather than walking it block by block; every
    # endpoint must still get exactly the length of the query prefix it holds,
    # whichever mix of lengths and diverging continuations the pool has. Hashes of
    # one width (the picker's) reach the script packed, others joined by spaces.
    store = StateStore(redis_client)
    rng = random.Random(5)
    for trial in range(6):
        query = [f"{trial:x}{i:015x}" if one_width else f"t{trial}q{i}" for i in range(256)]
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
        assert await store.admit("pool", f"r{i % 2}", [Option("a:1")], LEASE_MS, model="sql-lora" if i else "base")
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
    assert view.inflight == {"a:1": 2}
    await asyncio.sleep(0.4)
    await store.publish("pool", "alive", LEASE_MS, {"a:1": 1})
    view = await store.lookup("pool", [])
    assert view.inflight == {"a:1": 1}
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
    bucket = keys.index_bucket("p1")
    assert await redis_client.hkeys(keys.prefix_block("pool", bucket, "p1")) == [b"a:1"]
    assert not await redis_client.exists(keys.prefix_block("pool", bucket, "p3"))  # evicted, and no holder left
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
    assert view.inflight == {"a:1": 1}


async def test_a_checked_admission_refuses_an_endpoint_another_replica_took_meanwhile(redis_client: Redis) -> None:
    store = StateStore(redis_client)
    seen = (await store.lookup("pool", [], leave_out="me")).inflight.get("a:1", 0)
    await record(store, "a:1", [], replica="other")  # between this replica's lookup and its admission
    assert not await store.admit("pool", "me", [Option("a:1", 7, seen)], LEASE_MS)
    view = await store.lookup("pool", [])
    assert view.inflight == {"a:1": 1} and view.inflight_work == {}  # nothing written
    # Seen up to date (or no check): admitted.
    assert await store.admit("pool", "me", [Option("a:1", 7, seen + 1)], LEASE_MS)
    assert await store.admit("pool", "me", [Option("a:1", 7)], LEASE_MS)
    view = await store.lookup("pool", [])
    assert view.inflight == {"a:1": 3} and view.inflight_work == {"a:1": 14}


async def test_the_pools_total_is_the_sum_of_the_live_replicas_records(redis_client: Redis) -> None:
    # A decision reads the pool's total and its own record, not one record per replica: the total must stay
    # the records' sum through admissions, releases, heartbeats and ended leases.
    store = StateStore(redis_client)

    async def records_sum() -> dict[str, int]:
        out: dict[str, int] = {}
        for r in await redis_client.zrange(keys.pickers("pool"), 0, -1):
            for k, v in (await redis_client.hgetall(keys.inflight("pool", r.decode()))).items():
                out[k.decode()] = out.get(k.decode(), 0) + int(v)
        return {k: v for k, v in out.items() if v > 0}

    async def total() -> dict[str, int]:
        return {k.decode(): int(v) for k, v in (await redis_client.hgetall(keys.inflight_total("pool"))).items()}

    rng = random.Random(3)
    held: list[tuple[str, str, int, str]] = []
    for step in range(300):
        if held and rng.random() < 0.45:
            replica, endpoint, work, model = held.pop(rng.randrange(len(held)))
            await store.release("pool", replica, endpoint, work, model)
        else:
            args = (f"r{rng.randrange(6)}", f"e{rng.randrange(4)}", rng.choice([0, 3, 9]), rng.choice(["", "m"]))
            assert await store.admit("pool", args[0], [Option(args[1], args[2])], LEASE_MS, model=args[3])
            held.append(args)
        if step % 50 == 0:  # a stray release of a request no record holds changes nothing
            await store.release("pool", "r0", "nowhere", 4, "m")
        assert await total() == await records_sum(), step
    view = await store.lookup("pool", [], leave_out="r1")
    own = {k.decode(): int(v) for k, v in (await redis_client.hgetall(keys.inflight("pool", "r1"))).items()}
    expected = {k: n - own.get(k, 0) for k, n in (await records_sum()).items()}
    assert view.inflight == {k: n for k, n in expected.items() if n > 0 and "|" not in k and "@" not in k}
    # A heartbeat that replaces a record whole moves the total with it.
    await store.publish("pool", "r2", LEASE_MS, {"e0": 7})
    assert await total() == await records_sum()
    # A replica from before the total (a rolling upgrade): its record counts from the next heartbeat of anyone.
    await redis_client.hset(keys.inflight("pool", "old"), "e3", 5)
    await redis_client.zadd(keys.pickers("pool"), {"old": now_ms() + LEASE_MS})
    await store.publish("pool", "r0", LEASE_MS, {})
    assert (await total()).get("e3", 0) == (await records_sum())["e3"]


async def test_a_lookups_work_does_not_grow_with_the_replicas(redis_client: Redis) -> None:
    store = StateStore(redis_client)

    async def lookup_commands() -> int:
        await redis_client.config_resetstat()
        await store.lookup("pool", ["h1"], leave_out="r0")
        stats = await redis_client.info("commandstats")
        return sum(int(v["calls"]) for name, v in stats.items() if name not in ("cmdstat_evalsha", "cmdstat_eval"))

    await record(store, "a:1", ["h1"], replica="r0")
    few = await lookup_commands()
    for i in range(1, 40):
        await record(store, f"e{i % 5}", [], replica=f"r{i}")
    assert await lookup_commands() == few
    expected = {f"e{k}": sum(1 for i in range(1, 40) if i % 5 == k) for k in range(5)}
    assert (await store.lookup("pool", [], leave_out="r0")).inflight == expected


async def test_an_index_write_rewrites_only_what_changed(redis_client: Redis) -> None:
    store = StateStore(redis_client)
    lru = keys.endpoint_lru("pool", "a:1")
    prompt = [f"p{i}" for i in range(8)]
    tag = f"/{keys.index_bucket(prompt[0])}"
    await store.index("pool", "a:1", prompt[:5], 60_000, 1000)
    first = dict(await redis_client.zrange(lru, 0, -1, withscores=True))
    await asyncio.sleep(0.01)
    # The same prompt grown by three blocks, the first five held: those keep their recency, the new ones
    # rank just below the deepest held one, so the endpoint's blocks still fall in recency with depth.
    await store.index("pool", "a:1", prompt, 60_000, 1000, held_blocks=5)
    scores = dict(await redis_client.zrange(lru, 0, -1, withscores=True))
    assert all(scores[k] == v for k, v in first.items())
    assert [scores[(p + tag).encode()] for p in prompt] == sorted(scores.values(), reverse=True)
    assert scores[f"p5{tag}".encode()] < scores[f"p4{tag}".encode()]
    assert (await store.lookup("pool", prompt)).matched_blocks == {"a:1": 8}
    # A held match that no longer stands (the block left the LRU meanwhile) writes the whole prompt.
    await redis_client.zrem(lru, "p7" + tag)
    await store.index("pool", "a:1", prompt, 60_000, 1000, held_blocks=8)
    assert (await redis_client.zscore(lru, "p7" + tag)) is not None
    assert (await redis_client.zscore(lru, "p0" + tag)) > first[f"p0{tag}".encode()]


async def test_a_held_prompt_is_written_again_when_its_recency_nears_the_endpoints_turnover(
        redis_client: Redis) -> None:
    # An endpoint whose cache turns over in about 100 ms: a prompt it holds, unused for more than a quarter of
    # that, is written again at now; younger than that, it is left as it is.
    store = StateStore(redis_client)
    lru = keys.endpoint_lru("pool", "a:1")
    hot = ["h0", "h1"]
    h0 = f"h0/{keys.index_bucket('h0')}"
    await store.index("pool", "a:1", hot, 60_000, 6)
    for i in range(5):  # other prompts fill the LRU over about 100 ms
        await asyncio.sleep(0.025)
        await store.index("pool", "a:1", [f"c{i}a", f"c{i}b"], 60_000, 6)
    assert (await store.lookup("pool", hot)).matched_blocks == {}  # the hot prompt unused: gone
    await store.index("pool", "a:1", hot, 60_000, 6)
    before = await redis_client.zscore(lru, h0)
    await store.index("pool", "a:1", hot, 60_000, 6, held_blocks=2)  # young: nothing written
    assert await redis_client.zscore(lru, h0) == before
    for i in range(5):  # used every 25 ms while the others turn the cache over: it stays
        await asyncio.sleep(0.025)
        await store.index("pool", "a:1", [f"d{i}a", f"d{i}b"], 60_000, 6)
        await store.index("pool", "a:1", hot, 60_000, 6, held_blocks=len(hot))
        assert (await store.lookup("pool", hot)).matched_blocks == {"a:1": 2}, i
    assert await redis_client.zscore(lru, h0) > before


async def test_an_admission_carries_writes_before_it_and_its_own_after_it(redis_client: Redis) -> None:
    from gateway_state.placement_store import IndexWrite, ReleaseWrite
    store = StateStore(redis_client)
    assert await store.admit("pool", "other", [Option("a:1")], LEASE_MS)
    assert await store.admit("pool", "me", [Option("b:1", 3)], LEASE_MS)
    # Refused (another replica took a:1 since a lookup that saw none there): the release gathered before it
    # is applied, its own index write is not.
    assert not await store.admit("pool", "me", [Option("a:1", 0, 0)], LEASE_MS, before=[ReleaseWrite("me", "b:1", 3)],
                                 after=[IndexWrite("a:1", ["x1", "x2"], 60_000, 100)])
    view = await store.lookup("pool", ["x1", "x2"])
    assert view.inflight == {"a:1": 1} and view.matched_blocks == {}
    # Admitted: both.
    assert await store.admit("pool", "me", [Option("a:1", 0, 1)], LEASE_MS, before=[ReleaseWrite("other", "a:1")],
                             after=[IndexWrite("a:1", ["x1", "x2"], 60_000, 100)])
    view = await store.lookup("pool", ["x1", "x2"])
    assert view.inflight == {"a:1": 1} and view.matched_blocks == {"a:1": 2}


async def test_one_pools_prefix_index_spreads_over_the_shards_of_a_cluster(redis_cluster_port: int) -> None:
    """On a three-shard Redis Cluster, the pool's own keys sit on one shard and its prefix index on all of
    them; lookups, evictions across buckets and a forgotten endpoint read and write the right shards."""
    from redis.asyncio import RedisCluster
    cluster = RedisCluster(host="127.0.0.1", port=redis_cluster_port)
    await cluster.flushall()
    try:
        store = StateStore(cluster)
        prompts = [[f"{n:02d}-{i}" for i in range(4)] for n in range(48)]
        assert len({keys.index_bucket(p[0]) for p in prompts}) == keys.INDEX_BUCKETS
        for n, prompt in enumerate(prompts):
            assert await store.admit("pool", "r1", [Option(f"e{n % 3}")], LEASE_MS)
            await store.index("pool", f"e{n % 3}", prompt, 60_000, 1000)
        # Endpoints whose names differ in one digit (one subnet, one port) keep their LRUs on more than one
        # shard: their tags are hashes of the names, not the names (keys.endpoint_tag).
        neighbours = [f"127.0.0.1{d}:8000" for d in range(1, 7)]
        for n, endpoint in enumerate(neighbours):
            await store.index("pool", endpoint, [f"n{n}"], 60_000, 1000)
        lru_shards = {cluster.get_node_from_key(keys.endpoint_lru("pool", e)).name for e in neighbours}
        assert len(lru_shards) > 1
        for n, endpoint in enumerate(neighbours):
            assert await cluster.zcard(keys.endpoint_lru("pool", endpoint)) == 1
            assert (await store.lookup("pool", [f"n{n}"])).matched_blocks == {endpoint: 1}
            await store.forget_endpoint("pool", endpoint)

        by_shard = {}
        for node in cluster.get_primaries():
            found = await cluster.execute_command("KEYS", "gw:*", target_nodes=node)
            by_shard[node.name] = {k.decode() for k in found}
        index_shards = [name for name, found in by_shard.items() if any(":pfx:" in k for k in found)]
        pool_shards = [name for name, found in by_shard.items() if keys.pickers("pool") in found]
        assert len(index_shards) == 3 and len(pool_shards) == 1
        assert sum(1 for found in by_shard.values() for k in found if ":pfx:" in k) == 48 * 4

        for n, prompt in enumerate(prompts):
            view = await store.lookup("pool", [*prompt[:3], "other"], leave_out="r1")
            assert view.matched_blocks == {f"e{n % 3}": 3}
        assert (await store.lookup("pool", [])).inflight == {"e0": 16, "e1": 16, "e2": 16}

        # A small LRU evicts the oldest prompts' blocks, whichever bucket holds them.
        assert await store.index("pool", "e0", ["fresh-0", "fresh-1"], 60_000, 10) == 16 * 4 + 2 - 10
        assert (await store.lookup("pool", prompts[0])).matched_blocks == {}
        assert (await store.lookup("pool", prompts[45])).matched_blocks == {"e0": 4}
        await store.forget_endpoint("pool", "e0", batch=3)
        assert (await store.lookup("pool", prompts[45])).matched_blocks == {}
        assert (await store.lookup("pool", prompts[46])).matched_blocks == {"e1": 4}
        assert (await store.prefix_blocks_held("pool", ["e0", "e1"])) == {"e0": 0, "e1": 16 * 4}
    finally:
        await cluster.aclose()
