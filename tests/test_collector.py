"""The collector: vLLM and SGLang metric names to load samples, and a scrape loop that never crashes."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from collector.collector import PREFILL_WINDOW_MS, Collector, CollectorSettings, with_prefill_rate
from collector.metrics import CollectorMetrics
from collector.metrics_map import READ, GarbledMetrics, parse_series, to_load_sample
from gateway_state import keys
from gateway_state.lifecycle import cancel_and_wait, every
from gateway_state.placement_store import Option
from gateway_state.records import Config, Endpoint, FlowControl, LoadSample, Pool
from gateway_state.store import StateStore
from picker.saturation import estimated_waiting, has_room
from simulator.metrics import SGLangMetrics, VLLMMetrics
from simulator.physics import Physics
from simulator.pod import PodSpec, SimulatedPod
from tests.client import wait_for
from tests.conftest import FIXTURES, free_port, publish

OLD_VLLM = """# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 7.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.25
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="4",running_lora_adapters="old",waiting_lora_adapters=""} 1.7e+09
vllm:lora_requests_info{max_lora="4",running_lora_adapters="a,b",waiting_lora_adapters="c"} 1.8e+09
"""

SGLANG_TP2 = """# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="m",tp_rank="0"} 4.0
sglang:num_queue_reqs{model_name="m",tp_rank="1"} 4.0
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="m",tp_rank="0"} 9.0
sglang:num_running_reqs{model_name="m",tp_rank="1"} 9.0
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="m",tp_rank="0"} 0.5
sglang:token_usage{model_name="m",tp_rank="1"} 0.5
"""


def test_older_vllm_names_and_the_newest_lora_series() -> None:
    s = to_load_sample(OLD_VLLM, 1)
    assert (s.waiting, s.running, s.kv_cache_usage) == (3.0, 7.0, 0.25)
    assert s.running_adapters == ("a", "b") and s.waiting_adapters == ("c",) and s.max_adapters == 4
    assert s.base_model == "m"  # the metrics' model_name: other names a request gives are adapters


def test_sglang_tensor_parallel_ranks_count_once() -> None:
    s = to_load_sample(SGLANG_TP2, 1)
    assert (s.waiting, s.running, s.kv_cache_usage) == (4.0, 9.0, 0.5)


def test_llama_cpp_load_comes_from_its_metrics_and_slots() -> None:
    """A llama.cpp server with its four slots busy and one request deferred (read from the real server)."""
    text = (FIXTURES / "llama_cpp" / "metrics.txt").read_text()
    slots = json.loads((FIXTURES / "llama_cpp" / "slots.json").read_text())
    s = to_load_sample(text, 1, slots)
    assert (s.waiting, s.running, s.batch_limit) == (1.0, 4.0, 4.0)
    assert s.kv_cache_usage == pytest.approx(4 * 251 / (4 * 2048))  # busy slots' tokens over every slot's context
    # Its prompt counter leaves out reused tokens; the sample counts every prompt token, as vLLM's does.
    assert (s.prompt_tokens, s.cached_prompt_tokens) == (485 + 96, 96)
    assert {"block_size", "num_blocks", "adapters"} <= set(s.unreported) and "kv_cache_usage" not in s.unreported
    without = to_load_sample(text, 1, None)  # a server started with --no-slots
    assert without.kv_cache_usage == 0 and without.batch_limit == 0
    assert {"kv_cache_usage", "batch_limit"} <= set(without.unreported)
    with pytest.raises(GarbledMetrics):
        to_load_sample(text, 1, [{"id": 0}])


def _pages() -> list[str]:
    physics = Physics(num_blocks=2000)
    return [VLLMMetrics("m", physics, 4).render().decode(), SGLangMetrics("m", physics).render().decode(),
            OLD_VLLM, SGLANG_TP2, *sorted((FIXTURES / "metrics").glob("*.txt")), FIXTURES / "llama_cpp" / "metrics.txt"]


@pytest.mark.parametrize("page", _pages(), ids=["vllm", "sglang", "old-vllm", "sglang-tp2", "sglang-cache-info",
                                                "sglang-capacity", "llama-cpp"])
def test_only_the_series_read_are_parsed_and_they_parse_as_in_the_whole_page(page: str | Path) -> None:
    text = page.read_text() if isinstance(page, Path) else page
    whole = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in READ:
                whole.setdefault(sample.name, []).append((sample.labels, sample.value))
    assert whole and parse_series(text) == whole


@pytest.mark.parametrize("text", ["<html>not metrics</html>", "foo{bar 1", "# TYPE x gauge\nx 1\n", ""])
def test_garbled_or_foreign_metrics_are_rejected(text: str) -> None:
    with pytest.raises(GarbledMetrics):
        to_load_sample(text, 1)


async def _metrics_server(host: str, handler: Callable[[web.Request], Awaitable[web.Response]]) \
        -> tuple[web.AppRunner, int]:
    """A server on loopback that answers /metrics with `handler`, and its port."""
    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, host, port).start()
    return runner, port


@pytest.fixture
async def pods() -> AsyncIterator[dict[str, SimulatedPod]]:
    """A live vLLM pod, a live SGLang pod and a server that answers garbage, on loopback."""
    physics = Physics(num_blocks=2000)
    live = {"vllm": SimulatedPod(PodSpec("vllm-0", "127.0.4.1", free_port(), "vllm", "m"), physics),
            "sglang": SimulatedPod(PodSpec("sglang-0", "127.0.4.2", free_port(), "sglang", "m"), physics)}
    runners, engines = [], []
    for pod in live.values():
        engines.append(asyncio.create_task(pod.engine.run()))
        runner = web.AppRunner(pod.app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, pod.spec.host, pod.spec.port).start()
        runners.append(runner)
    async def oops(request: web.Request) -> web.Response:
        return web.Response(text="<html>oops</html>")

    runner, garbage_port = await _metrics_server("127.0.4.3", oops)
    runners.append(runner)
    live["garbage-port"] = garbage_port  # type: ignore[assignment]
    yield live
    for r in runners:
        await r.cleanup()
    for t in engines:
        t.cancel()


async def test_collector_publishes_samples_and_marks_failures_stale(redis_client: Redis,
                                                                   pods: dict[str, SimulatedPod]) -> None:
    vllm, sglang = pods["vllm"], pods["sglang"]
    endpoints = (Endpoint("vllm-0", vllm.spec.host, vllm.spec.port), Endpoint("sglang-0", sglang.spec.host,
                 sglang.spec.port), Endpoint("garbage", "127.0.4.3", pods["garbage-port"]),  # type: ignore[arg-type]
                 Endpoint("dead", "127.0.4.4", free_port()))
    store = StateStore(redis_client)
    await publish(store, Config(1, {"p": Pool("p", (8000,), endpoints=endpoints)}, {}))
    async with aiohttp.ClientSession() as http, http.post(f"http://{vllm.spec.host}:{vllm.spec.port}/sim/load",
                         json={"requests": 300, "prompt_tokens": 64}) as r:
        assert r.status == 200
    collector = Collector(store, CollectorSettings(scrape_interval_ms=50, scrape_timeout_ms=300), CollectorMetrics())
    stop = asyncio.Event()
    task = asyncio.create_task(collector.run(stop))

    async def every_endpoint_scraped() -> bool:
        samples = (await store.read_snapshot(["p"])).load.get("p", {})
        return len(samples) == len(endpoints) and samples[endpoints[0].key].running == 256 and \
            all(s.consecutive_failures >= 1 for e, s in samples.items() if e in (endpoints[2].key, endpoints[3].key))

    await wait_for(every_endpoint_scraped, 5.0)
    stop.set()
    await task
    samples = (await store.read_snapshot(["p"])).load["p"]
    v = samples[endpoints[0].key]
    assert v.ok and v.running == 256 and v.waiting == 44 and v.kv_cache_usage > 0
    assert (v.block_size, v.num_blocks) == (16, 2000)
    assert abs(v.scraped_at_ms - time.time() * 1000) < 2000
    s = samples[endpoints[1].key]
    assert s.ok and (s.block_size, s.num_blocks) == (16, 2000)
    for bad in endpoints[2:]:
        assert not samples[bad.key].ok and samples[bad.key].consecutive_failures >= 2, samples[bad.key]
    assert samples[endpoints[2].key].error.startswith("unparsable metrics")


async def test_each_sample_notes_the_gateways_requests_in_flight_when_scraped(
        redis_client: Redis, pods: dict[str, SimulatedPod]) -> None:
    """So a picker can tell a pod's load from elsewhere (here synthetic) from the gateway's own."""
    vllm, sglang = pods["vllm"], pods["sglang"]
    endpoints = (Endpoint("vllm-0", vllm.spec.host, vllm.spec.port),
                 Endpoint("sglang-0", sglang.spec.host, sglang.spec.port))
    store = StateStore(redis_client)
    await publish(store, Config(1, {"p": Pool("p", (8000,), endpoints=endpoints)}, {}))
    async with aiohttp.ClientSession() as http, http.post(f"http://{vllm.spec.host}:{vllm.spec.port}/sim/load",
                                                          json={"requests": 300, "prompt_tokens": 64}) as r:
        assert r.status == 200
    for replica, n in (("picker-a", 2), ("picker-b", 1)):  # two replicas' requests at the vLLM pod
        for _ in range(n):
            assert await store.admit("p", replica, [Option(endpoints[0].key)], 60_000)
    collector = Collector(store, CollectorSettings(scrape_interval_ms=50), CollectorMetrics())
    stop = asyncio.Event()
    task = asyncio.create_task(collector.run(stop))

    async def scraped() -> bool:
        samples = (await store.read_snapshot(["p"])).load.get("p", {})
        return len(samples) == 2 and samples[endpoints[0].key].running == 256

    await wait_for(scraped, 5.0)
    stop.set()
    await task
    samples = (await store.read_snapshot(["p"])).load["p"]
    v, s = samples[endpoints[0].key], samples[endpoints[1].key]
    assert (v.gateway_inflight, s.gateway_inflight) == (3, 0)
    # 300 requests there, 3 of them the gateway's: 297 from elsewhere stay; the queue is 44 with the
    # gateway's 3, and 45 once one more is admitted, not 3 - 256 (as if all it ran were the gateway's).
    assert estimated_waiting(v, 3) == 44 and estimated_waiting(v, 4) == 45
    assert not has_room(v, 3, FlowControl())


async def test_sglang_pod_answers_the_routers_discovery_calls(pods: dict[str, SimulatedPod]) -> None:
    pod = pods["sglang"]
    base = f"http://{pod.spec.host}:{pod.spec.port}"
    async with aiohttp.ClientSession() as http:
        for path in ("/get_model_info", "/model_info", "/get_server_info", "/server_info"):
            async with http.get(base + path) as r:
                assert r.status == 200 and json.loads(await r.text())
        async with http.get(base + "/health_generate") as r:
            assert r.status == 200
        async with http.get(base + "/metrics") as r:
            text = await r.text()
    assert 'sglang:num_queue_reqs{model_name="m",tp_rank="0"}' in text
    assert 'sglang:cache_config_info{num_pages="2000",page_size="16"} 1.0' in text


async def _serve(pod: SimulatedPod) -> tuple[web.AppRunner, asyncio.Task[None]]:
    engine = asyncio.create_task(pod.engine.run())
    runner = web.AppRunner(pod.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, pod.spec.host, pod.spec.port).start()
    return runner, engine


@pytest.mark.parametrize("runtime", ["vllm", "sglang"])
async def test_a_restarted_pod_leaves_the_prefix_index(redis_client: Redis, runtime: str) -> None:
    """Its KV cache died with the process, so the index must stop sending its prefixes there: in every
    pool that lists it (pools may share servers)."""
    spec = PodSpec("pod-0", "127.0.4.5", free_port(), runtime, "m")
    pod = SimulatedPod(spec, Physics(num_blocks=2000))
    runner, engine = await _serve(pod)
    endpoint, other = Endpoint("pod-0", spec.host, spec.port), Endpoint("elsewhere", "127.0.4.6", free_port())
    store = StateStore(redis_client)
    pools = ("p", "q")
    await publish(store, Config(1, {name: Pool(name, (8000,), endpoints=(endpoint, other)) for name in pools}, {}))
    blocks = [f"b{i}" for i in range(2500)]  # more than one FORGET batch
    for name in pools:
        for e in (endpoint, other):
            await store.index(name, e.key, blocks, 600_000, 10_000)
    collector = Collector(store, CollectorSettings(scrape_interval_ms=50, scrape_timeout_ms=300), CollectorMetrics())
    stop = asyncio.Event()
    task = asyncio.create_task(collector.run(stop))
    try:
        async with aiohttp.ClientSession() as http:
            r = await http.post(f"http://{spec.host}:{spec.port}/v1/completions",
                                json={"model": "m", "prompt": "hello " * 50, "max_tokens": 2})
            assert r.status == 200

            async def counted() -> bool:  # scraped with its counter above zero
                sample = (await store.read_snapshot(["p"])).load.get("p", {}).get(endpoint.key)
                return sample is not None and sample.prompt_tokens > 0

            await wait_for(counted, 5.0)
            assert (await store.lookup("p", blocks[:3])).matched_blocks == {endpoint.key: 3, other.key: 3}
            await runner.cleanup()
            engine.cancel()
            runner, engine = await _serve(SimulatedPod(spec, Physics(num_blocks=2000)))

            async def forgotten() -> bool:
                return all([endpoint.key not in (await store.lookup(name, blocks[:3])).matched_blocks
                            for name in pools])

            await wait_for(forgotten, 3.0)
        for name in pools:
            assert (await store.lookup(name, blocks[:3])).matched_blocks == {other.key: 3}
            assert await redis_client.zcard(keys.endpoint_lru(name, endpoint.key)) == 0
    finally:
        stop.set()
        await task
        await runner.cleanup()
        engine.cancel()


async def test_a_server_in_several_pools_is_scraped_once_a_round(redis_client: Redis) -> None:
    """One reading a round per server: the prefill speed and the restart check compare each reading with
    the one before, which must be the last round's, not another pool's a moment earlier."""
    text, hits = (FIXTURES / "llama_cpp" / "metrics.txt").read_text(), []

    async def metrics(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(text=text, content_type="text/plain")

    runner, port = await _metrics_server("127.0.4.8", metrics)
    endpoint = Endpoint("shared", "127.0.4.8", port)
    store = StateStore(redis_client)
    pools = ("p", "q", "r")
    await publish(store, Config(1, {name: Pool(name, (8000,), endpoints=(endpoint,)) for name in pools}, {}))
    await store.admit("q", "picker-a", [Option(endpoint.key)], 60_000)
    collector = Collector(store, CollectorSettings(), CollectorMetrics())
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(3):
                await collector.scrape_once(http)
    finally:
        await runner.cleanup()
    assert hits == ["/metrics"] * 3
    load = (await store.read_snapshot(list(pools))).load
    samples = {name: load[name][endpoint.key] for name in pools}
    assert all(s.ok and s.running == 4.0 for s in samples.values())
    # Each pool's sample carries that pool's requests in flight there.
    assert {name: s.gateway_inflight for name, s in samples.items()} == {"p": 0, "q": 1, "r": 0}


@pytest.mark.parametrize(("fixture", "page_size", "pages"), [
    ("sglang-cache-config-info.txt", 1, 155526),  # older servers: one info metric
    ("sglang-capacity-gauges.txt", 16, 9720),  # newer servers: gauges of their own
])
def test_both_generations_of_sglang_metrics_give_the_kv_capacity(fixture: str, page_size: int, pages: int) -> None:
    text = (FIXTURES / "metrics" / fixture).read_text()
    sample = to_load_sample(text, 0)
    assert (sample.block_size, sample.num_blocks) == (page_size, pages)
    assert (sample.waiting, sample.running, sample.kv_cache_usage) == (2.0, 7.0, 0.31)


def test_sglang_token_capacity_alone_gives_pages_of_one_token() -> None:
    text = (FIXTURES / "metrics" / "sglang-capacity-gauges.txt").read_text()
    tokens_only = "\n".join(line for line in text.splitlines()
                            if not line.startswith(("sglang:page_size", "sglang:num_pages"))) + "\n"
    sample = to_load_sample(tokens_only, 0)
    assert (sample.block_size, sample.num_blocks) == (1, 155520)


def test_the_prefill_speed_is_the_fastest_seen_over_a_window_and_starts_over_with_the_server() -> None:
    """Uncached prompt tokens (prompt less cache hits) per second, over windows of PREFILL_WINDOW_MS: the
    busiest window so far, whatever idle windows follow."""
    history: deque[tuple[int, float]] = deque()
    sample: LoadSample | None = None

    def scrape(at_ms: int, prompt: float, cached: float) -> LoadSample:
        nonlocal sample
        sample = with_prefill_rate(LoadSample(at_ms, True, prompt_tokens=prompt, cached_prompt_tokens=cached),
                                   sample, history)
        return sample

    assert scrape(1_000, 100, 0).prefill_tokens_per_s == 0  # one reading says nothing
    assert scrape(1_000 + PREFILL_WINDOW_MS - 100, 5_000, 0).prefill_tokens_per_s == 0  # too short a span
    busy = scrape(1_000 + PREFILL_WINDOW_MS, 8_100, 4_000)  # 4,000 of the 8,000 tokens since came from cache
    assert busy.prefill_tokens_per_s == pytest.approx(4_000 * 1000 / PREFILL_WINDOW_MS)
    t = 1_000 + PREFILL_WINDOW_MS
    for _ in range(3):  # idle for longer than the window: the speed seen stays
        t += PREFILL_WINDOW_MS
        assert scrape(t, 8_100, 4_000).prefill_tokens_per_s == busy.prefill_tokens_per_s
    assert len(history) <= 2
    restarted = scrape(t + 100, 50, 0)  # the counter fell: a new server, measured afresh
    assert restarted.prefill_tokens_per_s == 0 and restarted.prefill_rate_at_ms == t + 100


@pytest.mark.parametrize("runtime", ["vllm", "sglang"])
async def test_the_collector_measures_how_fast_a_pod_prefills(redis_client: Redis, runtime: str) -> None:
    """Cold prompts kept coming for a few seconds: the published speed is the simulated GPU's, within the
    step overhead and the prompts a step counts at once."""
    physics = Physics(num_blocks=4000, time_scale=10.0)  # 4,000 uncached tokens a second, less step overhead
    spec = PodSpec("pod-0", "127.0.4.7", free_port(), runtime, "m")
    runner, engine = await _serve(SimulatedPod(spec, physics))
    endpoint = Endpoint("pod-0", spec.host, spec.port)
    store = StateStore(redis_client)
    await publish(store, Config(1, {"p": Pool("p", (8000,), endpoints=(endpoint,))}, {}))
    collector = Collector(store, CollectorSettings(scrape_interval_ms=100, scrape_timeout_ms=500), CollectorMetrics())
    stop = asyncio.Event()
    task = asyncio.create_task(collector.run(stop))
    try:
        async with aiohttp.ClientSession() as http:
            async def cold(i: int) -> None:
                async with http.post(f"http://{spec.host}:{spec.port}/v1/completions",
                                     json={"model": "m", "prompt": f"prompt {i} " + "word " * 1500,
                                           "max_tokens": 1}) as r:
                    assert r.status == 200

            await asyncio.gather(*(cold(i) for i in range(26)))  # 39,000 tokens: about 10 s of prefill

            async def speed() -> float:
                sample = (await store.read_snapshot(["p"])).load.get("p", {}).get(endpoint.key)
                return sample.prefill_tokens_per_s if sample is not None else 0.0

            await wait_for(speed, 5.0)
        assert 0.6 * 4_000 <= await speed() <= 1.3 * 4_000
    finally:
        stop.set()
        await task
        await runner.cleanup()
        engine.cancel()


async def test_an_endpoint_that_leaves_its_pool_leaves_the_collectors_memory(
        redis_client: Redis, pods: dict[str, SimulatedPod]) -> None:
    """Its last sample and its prefill counter readings go with it, here and in Redis: pod churn over
    weeks must not grow the collector."""
    vllm, sglang = pods["vllm"], pods["sglang"]
    staying, leaving = (Endpoint("sglang-0", sglang.spec.host, sglang.spec.port),
                        Endpoint("vllm-0", vllm.spec.host, vllm.spec.port))
    store = StateStore(redis_client)
    await publish(store, Config(1, {"p": Pool("p", (8000,), endpoints=(staying, leaving))}, {}))
    collector = Collector(store, CollectorSettings(scrape_interval_ms=50, scrape_timeout_ms=300,
                                                   config_refresh_ms=100), CollectorMetrics())
    stop = asyncio.Event()
    task = asyncio.create_task(collector.run(stop))
    try:
        async def both_scraped() -> bool:
            return len((await store.read_snapshot(["p"])).load.get("p", {})) == 2

        await wait_for(both_scraped, 5.0)
        assert set(collector._prefill_history) == {staying.key, leaving.key}
        await publish(store, Config(2, {"p": Pool("p", (8000,), endpoints=(staying,))}, {}))

        async def forgotten() -> bool:
            return set((await store.read_snapshot(["p"])).load.get("p", {})) == {staying.key}

        await wait_for(forgotten, 5.0)
        assert set(collector._prefill_history) == {staying.key} and set(collector._last) == {staying.key}
    finally:
        stop.set()
        await task


async def test_a_loop_cancelled_in_the_turn_its_wait_ends_stops_as_cancelled() -> None:
    """The processes' loops (and the collector's KV streams) wait with a timeout; a cancel that arrives in
    the same turn as the end of that wait must still end the task as cancelled, or whoever awaits the task
    after cancelling it (a collector closing its streams) would wait on a loop that runs on."""
    stop, rounds = asyncio.Event(), 0

    async def action() -> None:
        nonlocal rounds
        rounds += 1

    task = asyncio.create_task(every(10.0, stop, action))
    await asyncio.sleep(0.01)  # one round done, waiting out the interval
    stop.set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert rounds == 1


async def test_a_cancel_a_librarys_wait_for_drops_is_repeated_until_the_task_ends() -> None:
    """redis-py sends each command under `asyncio.wait_for` when the client has a socket timeout; on
    Python 3.11 a cancel that lands in the turn the command's write completes is dropped there, and the
    loop that made the call runs on. `cancel_and_wait` cancels again until the task has ended."""
    loop = asyncio.get_running_loop()
    written: asyncio.Future[int] = loop.create_future()

    async def send() -> int:
        return await written

    async def a_loop() -> None:
        await asyncio.wait_for(send(), 10.0)  # as redis-py's send_packed_command
        while True:
            await asyncio.sleep(0.01)

    task = asyncio.create_task(a_loop())
    await asyncio.sleep(0)
    written.set_result(1)
    task.cancel()  # the same turn
    await asyncio.sleep(0.05)
    if sys.version_info < (3, 12):
        assert not task.done()  # the cancel was dropped: the loop runs on
    await cancel_and_wait(task)
    assert task.cancelled()
