"""The engines' KV-cache events, from the simulator's publisher through a real collector into Redis.

The simulator publishes as vLLM and SGLang do (ZMQ PUB and replay ROUTER, msgpack batches in both of
vLLM's encodings, their block hashes); a real collector follows each pod it owns and writes the index
under our own block keys. The index must hold exactly what the pod's cache holds.
"""

from __future__ import annotations

import asyncio
import hashlib
import pickle
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import msgpack
import pytest
from aiohttp import web
from redis.asyncio import Redis

from collector.collector import Collector, CollectorSettings
from collector.kv_events import BlockRemoved, BlockStored, EndpointIndex, Undecodable, decode_batch
from collector.metrics import CollectorMetrics
from gateway_state import keys
from gateway_state.block_keys import engine_root, token_keys
from gateway_state.kv_index_store import ONE_CALL_BLOCKS, Removed, Stored
from gateway_state.lifecycle import cancel_and_wait
from gateway_state.placement_store import SpeculativeWrite
from gateway_state.records import Config, Endpoint, KvEvents, KvStreamStatus, Pool, Runtime
from gateway_state.store import StateStore
from simulator.block_hashes import SglangHashes, VllmHashes
from simulator.kv_events import KvEventsConfig, offset_endpoint
from simulator.physics import Physics
from simulator.pod import PodSpec, SimulatedPod
from simulator.tokenizer import tokenize
from tests.client import wait_for
from tests.conftest import free_port, publish

SEED = 7  # the deployment's prefix seed in these tests


def test_vllm_block_hashes_are_sha256_over_the_parent_tokens_and_extra_keys() -> None:
    hasher = VllmHashes("sha256", seed="0")
    none = hashlib.sha256(pickle.dumps("0", protocol=pickle.HIGHEST_PROTOCOL)).digest()
    first = hasher.block(None, (1, 2, 3), ("lora-a", "salt"))
    assert first == hashlib.sha256(pickle.dumps((none, (1, 2, 3), ("lora-a", "salt")),
                                                protocol=pickle.HIGHEST_PROTOCOL)).digest()
    assert hasher.wire(first) == int.from_bytes(first[-8:], "big") and hasher.wire(first) >= 0
    assert VllmHashes("sha256_cbor", seed="0").block(None, (1, 2, 3), None) != hasher.block(None, (1, 2, 3), None)
    assert VllmHashes().none_hash != VllmHashes().none_hash or "PYTHONHASHSEED" in __import__("os").environ


def test_sglang_page_hashes_chain_sha256_over_little_endian_token_ids() -> None:
    hasher = SglangHashes()
    page = hasher.block(None, (1, 2), None)
    assert page == hashlib.sha256(b"\x01\x00\x00\x00\x02\x00\x00\x00").digest()
    assert hasher.block(page, (3,), None) == hashlib.sha256(page + b"\x03\x00\x00\x00").digest()
    assert hasher.wire(page) == int.from_bytes(page[:8], "big", signed=True)


def test_the_events_config_reads_as_the_engines_flag_and_ranks_offset_the_ports() -> None:
    vllm = KvEventsConfig.parse('{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:6000", '
                                '"replay_endpoint": "tcp://*:6001", "topic": "kv", "buffer_steps": 5}', "vllm")
    assert vllm == KvEventsConfig("tcp://*:6000", "tcp://*:6001", "kv", 5)
    assert KvEventsConfig.parse('{"publisher": "zmq"}', "vllm") is None  # vLLM needs enable_kv_cache_events
    assert KvEventsConfig.parse('{"publisher": "zmq"}', "sglang") == KvEventsConfig()
    assert KvEventsConfig.parse('{"enable_kv_cache_events": true, "publisher": "null"}', "vllm") is None
    with pytest.raises(ValueError):
        KvEventsConfig.parse('{"enable_kv_cache_events": true, "publisher": "kafka"}', "vllm")
    # `*` is the pod's own address; a data-parallel rank moves the port up by its number.
    assert offset_endpoint("tcp://*:5557", "127.0.0.9", 0) == "tcp://127.0.0.9:5557"
    assert offset_endpoint("tcp://*:5557", "127.0.0.9", 2) == "tcp://127.0.0.9:5559"
    assert offset_endpoint("tcp://10.0.0.1:5557", "127.0.0.9", 1) == "tcp://10.0.0.1:5558"


def _stored(**overrides: object) -> dict[str, object]:
    event: dict[str, object] = {"type": "BlockStored", "block_hashes": [11, 12], "parent_block_hash": None,
                                "token_ids": list(range(32)), "block_size": 16, "lora_id": None, "medium": "GPU",
                                "lora_name": None, "extra_keys": [None, None], "group_idx": 0}
    event.update(overrides)
    return event


def test_both_encodings_decode_to_the_same_events_and_index_keys() -> None:
    as_map = [_stored(), {"type": "BlockRemoved", "block_hashes": [12], "medium": "GPU"}, {"type": "AllBlocksCleared"}]
    as_array = [["BlockStored", [11, 12], None, list(range(32)), 16, None, "GPU", None, [None, None], 0],
                ["BlockRemoved", [12], "GPU"], ["AllBlocksCleared"]]
    decoded = [decode_batch(msgpack.packb([1.5, events, 0])) for events in (as_map, as_array)]
    assert decoded[0] == decoded[1]
    ts, events = decoded[0]
    assert ts == 1.5 and events[0] == BlockStored(("11", "12"), None, tuple(range(32)), 16)
    assert events[1] == BlockRemoved(("12",))
    # SGLang's shorter BlockStored, and a newer vLLM's extra fields and event type, decode too.
    _, short = decode_batch(msgpack.packb([0, [["BlockStored", [-5], None, [1, 2, 3], 3, None]], 0]))
    assert short == [BlockStored(("-5",), None, (1, 2, 3), 3)]
    _, newer = decode_batch(msgpack.packb([0, [_stored(kv_cache_spec_kind="full"), {"type": "Future"}], 0]))
    assert len(newer) == 1
    index = EndpointIndex(SEED)
    ops, orphans = index.apply(events[:1])
    assert orphans == 0
    assert [op.key for op in ops] == token_keys(engine_root(None, None, SEED), list(range(32)), 16, 10, SEED)  # type: ignore[union-attr]
    salted = EndpointIndex(SEED)
    ops, _ = salted.apply([BlockStored(("1",), None, tuple(range(16)), 16, "lora-a", ("lora-a", "s1"))])
    assert ops[0].key == token_keys(engine_root("lora-a", "s1", SEED), list(range(16)), 16, 1, SEED)[0]  # type: ignore[union-attr]
    _, orphaned = EndpointIndex(SEED).apply([BlockStored(("9",), "404", tuple(range(16)), 16)])
    assert orphaned == 1


@pytest.mark.parametrize("payload", [b"", b"\xc1", msgpack.packb({"x": 1}), msgpack.packb([0, "nope", 0]),
                                     msgpack.packb([0, [["BlockStored", [1], None, [1] * 17, 16]], 0]),
                                     msgpack.packb([0, [["BlockStored", ["h"], None, [1], 1]], 0]),
                                     msgpack.packb([0, [[7]], 0]), msgpack.packb([0, [{"type": "BlockStored"}], 0])])
def test_garbage_is_refused_as_undecodable(payload: bytes) -> None:
    with pytest.raises(Undecodable):
        decode_batch(payload)


# -- through a real collector --------------------------------------------------------------------


@dataclass
class LivePod:
    pod: SimulatedPod
    runner: web.AppRunner
    engine: asyncio.Task[None]

    @property
    def key(self) -> str:
        return f"{self.pod.spec.host}:{self.pod.spec.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()
        self.engine.cancel()
        assert self.pod.events is not None
        await self.pod.events.close()


async def start_pod(runtime: str, host: str, port: int, events_port: int, encoding: str = "array",
                    num_blocks: int = 48) -> LivePod:
    config = KvEventsConfig(endpoint=f"tcp://*:{events_port}", replay_endpoint=f"tcp://*:{events_port + 1}",
                            topic="kv@test")
    pod = SimulatedPod(PodSpec(f"{runtime}-0", host, port, runtime, "m", kv_events=config,
                               kv_events_encoding=encoding), Physics(num_blocks=num_blocks, time_scale=0.01))
    assert pod.events is not None
    pod.events.start()
    engine = asyncio.create_task(pod.engine.run())
    runner = web.AppRunner(pod.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return LivePod(pod, runner, engine)


async def complete(live: LivePod, prompt: str) -> None:
    async with aiohttp.ClientSession() as http, http.post(
            f"http://{live.key}/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 2}) as r:
        assert r.status == 200, await r.text()


async def index_of(store: StateStore, redis: Redis, pool: str, endpoint: str) -> dict[str, str]:
    """engine hash -> our key, checking that each key's entry names the endpoint."""
    blocks = await store.kv_block_map(pool, endpoint)
    for key, bucket in blocks.values():
        assert await redis.hexists(keys.prefix_block(pool, bucket, key), endpoint), key
    return {h: key for h, (key, _) in blocks.items()}


def cached(live: LivePod) -> set[str]:
    engine = live.pod.engine
    return {str(engine.hasher.wire(h)) for h in engine.cache.cached() if isinstance(h, bytes)}


async def caught_up(store: StateStore, pool: str, live: LivePod) -> Callable[[], Awaitable[bool]]:
    async def done() -> bool:
        status = (await store.kv_statuses(pool)).get(live.key)
        assert live.pod.events is not None
        return status is not None and status.seq == live.pod.events.seq - 1
    return done


PROMPTS = [f"Conversation {i}: " + "a shared system prompt about routing and caches. " * 20 + f"question {i} " * 12
           for i in range(6)]


@pytest.fixture
async def collector_for(shared_redis: Redis) -> AsyncIterator[Callable[[str], Awaitable[None]]]:
    tasks: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    async def start(name: str) -> None:
        stop = asyncio.Event()
        collector = Collector(StateStore(shared_redis), CollectorSettings(collector_id=name, scrape_interval_ms=50),
                              CollectorMetrics())
        tasks.append((stop, asyncio.create_task(collector.run(stop))))

    yield start
    for stop, task in tasks:
        stop.set()
        await cancel_and_wait(task)


@pytest.mark.parametrize(("runtime", "encoding"), [("vllm", "array"), ("vllm", "map"), ("sglang", "array")])
async def test_the_index_holds_exactly_what_the_pods_cache_holds(
        shared_redis: Redis, collector_for: Callable[[str], Awaitable[None]], runtime: str, encoding: str) -> None:
    redis_client = shared_redis
    store = StateStore(redis_client)
    host = {"vllm": "127.0.5.1", "sglang": "127.0.5.2"}[runtime]
    events_port = free_port()
    live = await start_pod(runtime, host, free_port(), events_port, encoding)
    try:
        port = live.pod.spec.port
        pool = Pool("p", (port,), runtime=Runtime(runtime), endpoints=(Endpoint("pod", host, port),),
                    kv_events=KvEvents(events_port, events_port + 1))
        await publish(store, Config(1, {"p": pool}, {}, prefix_seed=SEED))
        await collector_for("c1")
        await complete(live, PROMPTS[0])  # the first batches may pass before the collector subscribes: replayed
        await wait_for(await caught_up(store, "p", live), 5.0)
        assert set(await index_of(store, redis_client, "p", live.key)) == cached(live)
        # Under our own keys: a picker computes them from the prompt's tokens alone.
        ids = tokenize(PROMPTS[0])
        mine = token_keys(engine_root(None, None, SEED), ids, 16, 1000, SEED)
        assert set(mine) <= set((await index_of(store, redis_client, "p", live.key)).values())
        # 48 blocks hold about two of these prompts: each new one evicts, and each batch's removals
        # leave the index with the batch.
        for prompt in PROMPTS[1:]:
            await complete(live, prompt)
            await wait_for(await caught_up(store, "p", live), 5.0)
            assert set(await index_of(store, redis_client, "p", live.key)) == cached(live)
        assert not set(mine) <= set((await index_of(store, redis_client, "p", live.key)).values())  # evicted
        status = (await store.kv_statuses("p"))[live.key]
        assert status.live and status.block_size == 16 and status.blocks == len(cached(live))
        assert (status.gaps, status.resyncs, status.garbage, status.orphans) == (0, 0, 0, 0)
    finally:
        await live.stop()


async def test_a_restarted_pod_drops_its_entries_and_a_replaced_collector_replays_without_a_gap(
        shared_redis: Redis, collector_for: Callable[[str], Awaitable[None]]) -> None:
    redis_client = shared_redis
    store = StateStore(redis_client)
    host, port, events_port = "127.0.5.3", free_port(), free_port()
    live = await start_pod("vllm", host, port, events_port, num_blocks=400)
    pool = Pool("p", (port,), endpoints=(Endpoint("pod", host, port),),
                kv_events=KvEvents(events_port, events_port + 1))
    await publish(store, Config(1, {"p": pool}, {}, prefix_seed=SEED))
    stop_first = asyncio.Event()
    first = asyncio.create_task(Collector(store, CollectorSettings(collector_id="c1", scrape_interval_ms=50),
                                          CollectorMetrics()).run(stop_first))
    try:
        await complete(live, PROMPTS[0])
        await wait_for(await caught_up(store, "p", live), 5.0)
        # The collector dies mid-stream (no goodbye); the pod goes on caching.
        await cancel_and_wait(first)
        await store.leave_collectors("c1")
        for prompt in PROMPTS[1:4]:
            await complete(live, prompt)
        await collector_for("c2")  # takes the pod over: replays what it missed, from the last batch applied
        await wait_for(await caught_up(store, "p", live), 5.0)
        assert set(await index_of(store, redis_client, "p", live.key)) == cached(live)
        status = (await store.kv_statuses("p"))[live.key]
        assert status.collector == "c2" and status.resyncs == 0 and status.blocks == len(cached(live))
        # Garbage on the socket: counted and skipped.
        events = live.pod.events
        assert events is not None
        events._pub.send_multipart([b"kv@test", b"short"])
        events._pub.send_multipart([b"kv@test", events.seq.to_bytes(8, "big"), b"\xc1 not msgpack"])
        events._buffer.append((events.seq, b"\xc1 not msgpack"))
        events.seq += 1
        await complete(live, PROMPTS[4])
        await wait_for(await caught_up(store, "p", live), 5.0)
        status = (await store.kv_statuses("p"))[live.key]
        assert status.garbage == 2 and status.resyncs == 0
        assert set(await index_of(store, redis_client, "p", live.key)) == cached(live)
        # The pod restarts: a new engine (its cache empty, its hashes seeded anew), batches from 0 again.
        await live.stop()
        live = await start_pod("vllm", host, port, events_port, num_blocks=400)
        await complete(live, PROMPTS[5])
        await wait_for(await caught_up(store, "p", live), 5.0)
        assert set(await index_of(store, redis_client, "p", live.key)) == cached(live)
        status = (await store.kv_statuses("p"))[live.key]
        assert status.resyncs == 1 and status.blocks == len(cached(live))
    finally:
        await live.stop()


async def script_calls(redis: Redis) -> int:
    """Scripts Redis ran since its counters were reset."""
    stats = await redis.info("commandstats")
    return sum(int(v["calls"]) for name, v in stats.items() if name in ("cmdstat_evalsha", "cmdstat_eval"))


async def test_on_one_redis_a_batch_is_one_call_that_writes_holders_map_and_status(redis_client: Redis) -> None:
    """Blocks of two buckets stored, one removed: one script call on one Redis (a cluster takes one per slot),
    and what it leaves is what the calls in turn leave: holders, the engine's map, the stream's status."""
    store = StateStore(redis_client)
    root = engine_root(None, None, SEED)
    chains = [token_keys(root, list(range(s, s + 32)), 16, 10, SEED) for s in range(0, 640, 32)]
    first = chains[0]
    b1 = keys.index_bucket(first[0])
    other = next(c for c in chains if keys.index_bucket(c[0]) != b1)  # another bucket
    b2 = keys.index_bucket(other[0])
    ops = [Stored("e1", first[0], b1), Stored("e2", first[1], b1), Stored("e3", other[0], b2),
           Removed("e2", first[1], b1)]
    await store.kv_apply("p", "10.0.0.2:8000", [], KvStreamStatus("c", "live", 0))  # Redis now holds the script
    await redis_client.config_resetstat()
    held = await store.kv_apply("p", "10.0.0.1:8000", ops, KvStreamStatus("c", "live", 0, seq=7))
    assert await script_calls(redis_client) == 1
    assert held == 2
    assert await store.kv_block_map("p", "10.0.0.1:8000") == {"e1": (first[0], b1), "e3": (other[0], b2)}
    assert await redis_client.hexists(keys.prefix_block("p", b1, first[0]), "10.0.0.1:8000")
    assert await redis_client.hexists(keys.prefix_block("p", b2, other[0]), "10.0.0.1:8000")
    assert not await redis_client.hexists(keys.prefix_block("p", b1, first[1]), "10.0.0.1:8000")
    assert (await store.kv_statuses("p"))["10.0.0.1:8000"].seq == 7


async def test_a_batch_too_large_for_one_call_goes_in_chunks_with_the_same_result(redis_client: Redis) -> None:
    store = StateStore(redis_client)
    n = ONE_CALL_BLOCKS + 40
    blocks = token_keys(engine_root(None, None, SEED), list(range(16 * n)), 16, n, SEED)
    bucket = keys.index_bucket(blocks[0])
    await redis_client.config_resetstat()
    held = await store.kv_apply("p", "10.0.0.1:8000", [Stored(f"e{i}", b, bucket) for i, b in enumerate(blocks)],
                                KvStreamStatus("c", "live", 0, seq=3))
    assert await script_calls(redis_client) > 1
    assert held == len(blocks) == n
    assert await redis_client.hexists(keys.prefix_block("p", bucket, blocks[-1]), "10.0.0.1:8000")
    assert (await store.kv_statuses("p"))["10.0.0.1:8000"].seq == 3


async def test_speculative_entries_count_until_their_time_passes_and_events_stand_alone(shared_redis: Redis) -> None:
    """LOOKUP on an index built from events: a picker's speculative entry counts while it lives, only where
    the caller asks for them; the engine's own entry stands without a lifetime."""
    redis_client = shared_redis
    store = StateStore(redis_client)
    blocks = token_keys(engine_root(None, None, SEED), list(range(64)), 16, 10, SEED)
    bucket = keys.index_bucket(blocks[0])
    await store.write("p", [SpeculativeWrite("10.0.0.1:8000", blocks, 300, bucket)])
    assert await redis_client.hexists(keys.speculative_block("p", bucket, blocks[0]), "10.0.0.1:8000")
    assert (await store.lookup("p", blocks, speculative=True)).matched_blocks == {"10.0.0.1:8000": 4}
    assert (await store.lookup("p", blocks)).matched_blocks == {}  # an approximate pool reads none
    await store.kv_apply("p", "10.0.0.2:8000", [Stored(f"e{i}", b, bucket) for i, b in enumerate(blocks[:2])],
                         KvStreamStatus("c", "live", 0))
    await asyncio.sleep(0.4)
    assert (await store.lookup("p", blocks, speculative=True)).matched_blocks == {"10.0.0.2:8000": 2}
    # The key went with its entries.
    assert not await redis_client.exists(keys.speculative_block("p", bucket, blocks[0]))


async def test_the_earlier_layouts_event_entries_are_dropped(shared_redis: Redis) -> None:
    """Entries a collector of the layout before the buckets wrote (the pod's map and its blocks' holders, all
    under the pool's tag) are removed, with the holders of other pods left alone."""
    store = StateStore(shared_redis)
    prefix = keys.pool_prefix("p")
    await shared_redis.hset(keys.legacy_kv_blocks("p", "10.0.0.1:8000"), mapping={"e1": "k1", "e2": "k2"})
    for key in ("k1", "k2"):
        await shared_redis.hset(prefix + "pfx:" + key, mapping={"10.0.0.1:8000": "1", "10.0.0.2:8000": "1"})
    assert await store.drop_legacy("p", "10.0.0.1:8000") == 2
    assert not await shared_redis.exists(keys.legacy_kv_blocks("p", "10.0.0.1:8000"))
    for key in ("k1", "k2"):
        assert await shared_redis.hkeys(prefix + "pfx:" + key) == [b"10.0.0.2:8000"]
    assert await store.drop_legacy("p", "10.0.0.1:8000") == 0


async def test_the_entries_of_the_layout_before_hashed_endpoint_tags_are_dropped(shared_redis: Redis) -> None:
    """A map a collector wrote when an endpoint's tag was its name (keys.earlier_endpoint_prefix) goes, with
    the endpoint's holders of its blocks (in today's buckets) and no other pod's; the new map is kept."""
    store = StateStore(shared_redis)
    earlier = keys.earlier_endpoint_prefix("p", "10.0.0.1:8000") + "kvmap"
    assert earlier != keys.kv_blocks("p", "10.0.0.1:8000")
    await shared_redis.hset(earlier, mapping={"e1": "k1/3", "e2": "k2/5"})
    await shared_redis.hset(keys.kv_blocks("p", "10.0.0.1:8000"), mapping={"e9": "k9/3"})
    for key, bucket in (("k1", 3), ("k2", 5)):
        await shared_redis.hset(keys.prefix_block("p", bucket, key), mapping={"10.0.0.1:8000": "1",
                                                                             "10.0.0.2:8000": "1"})
    assert await store.drop_legacy("p", "10.0.0.1:8000") == 2
    assert not await shared_redis.exists(earlier)
    for key, bucket in (("k1", 3), ("k2", 5)):
        assert await shared_redis.hkeys(keys.prefix_block("p", bucket, key)) == [b"10.0.0.2:8000"]
    assert await store.kv_block_map("p", "10.0.0.1:8000") == {"e9": ("k9", 3)}
    assert await store.drop_legacy("p", "10.0.0.1:8000") == 0


async def test_a_forgotten_endpoint_leaves_the_holders_its_earlier_layouts_lru_named(shared_redis: Redis) -> None:
    """After an upgrade, an LRU written when the endpoint's tag was its name still names blocks whose holders
    (in today's buckets) include the endpoint: forgetting the endpoint (its server restarted) removes those
    too, and the old LRU with them."""
    store = StateStore(shared_redis)
    endpoint, blocks = "10.0.0.1:8000", ["b1", "b2"]
    bucket = keys.index_bucket(blocks[0])
    earlier_lru = keys.earlier_endpoint_prefix("p", endpoint) + "lru"
    await shared_redis.zadd(earlier_lru, {f"{b}/{bucket}": n for n, b in enumerate(blocks)})
    for b in blocks:
        await shared_redis.hset(keys.prefix_block("p", bucket, b), mapping={endpoint: "1", "10.0.0.2:8000": "1"})
    assert (await store.lookup("p", blocks)).matched_blocks == {endpoint: 2, "10.0.0.2:8000": 2}
    await store.forget_endpoint("p", endpoint)
    assert (await store.lookup("p", blocks)).matched_blocks == {"10.0.0.2:8000": 2}
    assert not await shared_redis.exists(earlier_lru)
