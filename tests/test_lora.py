"""LoRA adapters: the simulator serves them as vLLM does, and the picker places requests by them."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway_state import keys
from gateway_state.lifecycle import connect
from gateway_state.records import Config, Criticality, Endpoint, LoadSample, Model, Pool, TargetModel, decode_load
from local_fleet.fleet import Fleet
from picker.intake import Intake
from picker.plugins.filters import LoraSlotFilter
from picker.plugins.framework import Candidate, SchedulingRequest
from picker.plugins.scorers import AdapterHomeScorer, LoraAffinityScorer, adapter_state
from picker.settings import PrefixSettings, SchedulingSettings
from simulator.engine import Engine, Sequence
from simulator.lora import Adapters
from simulator.physics import Physics
from simulator.pod import PodSpec, SimulatedPod
from simulator.tokenizer import tokenize
from tests.client import QWEN, chat, post, wait_for
from tests.conftest import DEFAULT_PORT, free_port
from tests.test_simulator import Recorder

LORA_WEIGHT = SchedulingSettings().lora_affinity_weight  # a pod running the adapter scores all of it


def seq(text: str, adapter: str | None, max_tokens: int = 40) -> Sequence:
    tokens = tokenize(text)
    return Sequence(request_id=text, tokens=tokens, num_prompt=len(tokens), max_tokens=max_tokens,
                    finish_reason="length", adapter=adapter, events=asyncio.Queue())


async def test_a_batch_holds_at_most_max_loras_adapters_and_pays_to_load_one() -> None:
    adapters = Adapters(max_loras=1, max_cpu_loras=2, load_s=0.05, activate_s=0.01, paths={"a": "/a", "b": "/b"})
    engine = Engine(Physics(time_scale=0.2), Recorder(), adapters)
    runner = asyncio.create_task(engine.run())
    try:
        first, second, third = seq("one", "a"), seq("two", "b"), seq("three", "a")
        for s in (first, second, third):
            engine.submit(s)
        await asyncio.sleep(0.05)
        # One slot: "b" waits while "a" runs, and a later request for "a" joins the batch past it.
        assert first.state == third.state == "running" and second.state == "waiting"
        while second.state != "done":
            await asyncio.sleep(0.02)
        assert adapters.loads == 2 and adapters.activations == 2
        engine.submit(again := seq("four", "a", 2))  # "a" left the GPU for "b" but stayed in the CPU cache
        while again.state != "done":
            await asyncio.sleep(0.02)
        assert adapters.loads == 2 and adapters.activations == 3
    finally:
        runner.cancel()


def test_adapter_slots_need_a_cpu_cache_at_least_as_large() -> None:
    with pytest.raises(ValueError, match="max_cpu_loras"):
        Adapters(max_loras=4, max_cpu_loras=2, load_s=0, activate_s=0)


@pytest.fixture
async def lora_pod() -> AsyncIterator[str]:
    port = free_port()
    pod = SimulatedPod(PodSpec("lora", "127.0.0.1", port, "vllm", QWEN, enable_lora=True,
                               lora_modules=(("sql-lora", "/adapters/sql"),), max_loras=4), Physics(time_scale=0.2))
    runner = web.AppRunner(pod.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    engine = asyncio.create_task(pod.engine.run())
    yield f"127.0.0.1:{port}"
    engine.cancel()
    await runner.cleanup()


async def test_the_pod_lists_loads_and_unloads_adapters_as_vllm(lora_pod: str) -> None:
    async with aiohttp.ClientSession() as http:
        async def models() -> dict[str, str]:
            async with http.get(f"http://{lora_pod}/v1/models") as r:
                return {m["id"]: m["root"] for m in (await r.json())["data"]}

        assert await models() == {QWEN: QWEN, "sql-lora": "/adapters/sql"}
        load = {"lora_name": "tweet-summary", "lora_path": "/adapters/tweet"}
        async with http.post(f"http://{lora_pod}/v1/load_lora_adapter", json=load) as r:
            assert r.status == 200 and "added successfully" in await r.text()
        async with http.post(f"http://{lora_pod}/v1/load_lora_adapter", json=load) as r:
            assert r.status == 400 and "already been loaded" in (await r.json())["error"]["message"]
        assert (await models())["tweet-summary"] == "/adapters/tweet"
        body = {"model": "tweet-summary", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        async with http.post(f"http://{lora_pod}/v1/chat/completions", json=body) as r:
            assert r.status == 200
        async with http.post(f"http://{lora_pod}/v1/load_lora_adapter", json={"lora_name": "x"}) as r:
            assert r.status == 400
        async with http.post(f"http://{lora_pod}/v1/unload_lora_adapter", json={"lora_name": "tweet-summary"}) as r:
            assert r.status == 200
        async with http.post(f"http://{lora_pod}/v1/chat/completions", json=body) as r:
            assert r.status == 404
        async with http.post(f"http://{lora_pod}/v1/unload_lora_adapter", json={"lora_name": "tweet-summary"}) as r:
            assert r.status == 404


async def test_lora_requests_info_reports_running_and_waiting_adapters_and_max_lora(lora_pod: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://{lora_pod}/sim/load", json={"requests": 2, "prompt_tokens": 16,
                                                                  "adapter": "sql-lora"}) as r:
            assert r.status == 200
        await asyncio.sleep(0.1)
        async with http.get(f"http://{lora_pod}/metrics") as r:
            text = await r.text()
    line = max((ln for ln in text.splitlines() if ln.startswith("vllm:lora_requests_info{")),
               key=lambda ln: float(ln.rsplit(" ", 1)[1]))
    assert 'max_lora="4"' in line and 'running_lora_adapters="sql-lora"' in line
    assert 'waiting_lora_adapters=""' in line


def candidate(name: str, running: tuple[str, ...] = (), waiting: tuple[str, ...] = (), max_adapters: int = 2,
              inflight: int = 0) -> Candidate:
    load = LoadSample(0, True, running_adapters=running, waiting_adapters=waiting, max_adapters=max_adapters,
                      base_model=QWEN)
    return Candidate(Endpoint(name, "10.0.0.1", 8000), load, 0, inflight, 0)


def request(model: str) -> SchedulingRequest:
    return SchedulingRequest(model, 0, 0)


def test_adapter_affinity_prefers_running_then_waiting_then_a_free_slot_and_avoids_full_pods() -> None:
    pods = [candidate("runs", running=("sql",)), candidate("waits", running=("x",), waiting=("sql",)),
            candidate("free", running=("x",)), candidate("full", running=("x", "y"))]
    assert [adapter_state(request("sql"), c) for c in pods] == ["running", "waiting", "free", "full"]
    assert LoraAffinityScorer().score(request("sql"), pods) == [1.0, 0.8, 0.6, 0.0]
    assert [c.endpoint.name for c in LoraSlotFilter().filter(request("sql"), pods)] == ["runs", "waits", "free"]
    # The base model scores alike everywhere, and a full pod still serves it.
    assert len(set(LoraAffinityScorer().score(request(QWEN), pods))) == 1
    assert len(LoraSlotFilter().filter(request(QWEN), pods)) == 4
    # Every pod full: none is dropped.
    full = [candidate("a", running=("x", "y")), candidate("b", running=("x", "z"))]
    assert len(LoraSlotFilter().filter(request("sql"), full)) == 2


def test_a_running_adapter_is_worth_a_few_requests_in_flight_then_its_burst_spreads() -> None:
    from picker.scheduler import Scheduler, build_profiles
    from picker.settings import SchedulingSettings

    scheduler = Scheduler(build_profiles(SchedulingSettings(), random.Random(1)))
    for extra, expected in ((0, "runs"), (3, "runs"), (12, "free")):
        pods = [candidate("runs", running=("sql",), inflight=extra), candidate("free", running=("x",))]
        assert scheduler.schedule("DEFAULT", request("sql"), pods).endpoints[0].endpoint.name == expected


async def test_through_the_gateway_an_adapters_requests_go_where_it_runs_and_a_cold_burst_spreads(
        fleet: Fleet) -> None:
    pods = {name: key for key, (name, _) in fleet.pods().items() if name.startswith("default-")}
    # Not the adapter's rendezvous home, where its requests would go without any LoRA affinity.
    addresses = {name: key.rsplit(":", 1) for name, key in pods.items()}
    listed = [Candidate(Endpoint(name, host, int(port)), LoadSample(0, True, running_adapters=("x",), max_adapters=2,
                                                                    base_model=QWEN),
                        0, 0, 0) for name, (host, port) in sorted(addresses.items())]
    home = listed[AdapterHomeScorer().score(request("sql-lora"), listed).index(1.0)].endpoint.name
    holder = next(name for name in sorted(pods) if name != home)
    redis = connect(fleet.redis_url)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        async with http.post(f"http://{pods[holder]}/sim/load", json={"requests": 2, "prompt_tokens": 16,
                                                                       "adapter": "sql-lora"}) as r:
            assert r.status == 200
        try:
            async def running_there() -> bool:  # the latest sample shows the adapter running there
                raw = await redis.hget(keys.load("default/default-pool"), pods[holder])
                sample = decode_load(raw) if raw is not None else None
                return sample is not None and sample.ok and "sql-lora" in sample.running_adapters

            served, explained = [], []
            for i in range(6):
                # On a loaded machine a scrape of the busy pod can fail or lag, and for that moment its
                # adapters are unknown and the adapter's home decides: each request goes once the pickers'
                # snapshot (refreshed every 50 ms) holds a good sample showing the adapter running there.
                await wait_for(running_there, 5.0)
                await asyncio.sleep(0.1)
                body = chat(f"sql {i}", model="sql-lora", max_tokens=2)
                explained.append(await scores_now(http, fleet, body))
                served.append((await post(http, DEFAULT_PORT, body)).pod)
            # Without LoRA affinity they would go to the adapter's home, which is another pod: the first goes to
            # the holder, and each goes where the adapter runs, as a picker saw it just before (a request the
            # holder's queue sent to the home runs the adapter there too, and the home then wins while a sample
            # shows it). One may miss: a sample scraped while the previous request waited at the holder shows
            # a queue that is already gone. On failure, the scores a picker gave each request.
            where_it_ran = [e["lora-affinity"][pods[pod]] == LORA_WEIGHT for pod, e in zip(served, explained,
                                                                                           strict=True)]
            assert served[0] == holder and sum(where_it_ran) >= 5, "\n".join(
                f"{pod}: {json.dumps(e)}" for pod, e in zip(served, explained, strict=True))
        finally:
            async with http.delete(f"http://{pods[holder]}/sim/load") as r:
                assert r.status == 200
            await redis.aclose()
        # A cold adapter's burst: no pod runs it, so load spreads the burst. Once its requests run at the
        # adapter's home, the home leads by 1.3 (the adapter running there, 0.8; its home, 0.5), which eleven
        # requests in flight there undo (0.125 each): twice that many, long enough to be in flight together
        # on a loaded machine too.
        burst = await asyncio.gather(*(post(http, DEFAULT_PORT, chat(f"tweet {i}", model="tweet-summary",
                                                                      max_tokens=64)) for i in range(24)))
        assert all(r.status == 200 for r in burst)
        assert len({r.pod for r in burst}) >= 2, [r.pod for r in burst]


async def scores_now(http: aiohttp.ClientSession, fleet: Fleet, body: dict[str, Any]) -> dict[str, Any]:
    """A picker's decision for `body` now (`/admin/explain`): each scorer's weighted figure per pod, the totals."""
    async with http.post(f"http://127.0.0.1:{fleet.settings.picker_admin_ports[0]}/admin/explain", json=body,
                         headers={"Authorization": f"Bearer {fleet.admin_tokens['read']}"}) as r:
        assert r.status == 200, await r.text()
        explained = await r.json()
    return {"pick": explained["pick_name"], "totals": explained["totals"],
            **{s["name"]: {pod: round(w, 3) for pod, w in s["weighted"].items()} for s in explained["scorers"]}}


def test_an_adapter_in_flight_at_a_pod_counts_as_waiting_there_but_the_base_model_never_does() -> None:
    routed = replace(candidate("routed", running=("x",)), model_inflight=2)
    assert adapter_state(request("sql"), routed) == "waiting"
    assert adapter_state(request(QWEN), routed) == "none"


def test_each_adapter_has_one_home_on_every_replica_and_the_base_model_none() -> None:
    pods = [candidate(f"pod-{i}", running=("x",)) for i in range(4)]
    pods = [replace(c, endpoint=Endpoint(c.endpoint.name, f"10.0.0.{i}", 8000)) for i, c in enumerate(pods)]
    def homes(candidates: list[Candidate]) -> dict[str, str]:
        return {a: candidates[AdapterHomeScorer().score(request(a), candidates).index(1.0)].endpoint.key
                for a in (f"adapter-{i}" for i in range(16))}

    # Every replica lists the pool's endpoints in its own order (a config generation, a subset hint):
    # the home is the endpoint's, not a position.
    assert homes(pods) == homes(pods[::-1]) == homes([pods[2], pods[0], pods[3], pods[1]])
    assert len(set(homes(pods).values())) >= 3  # the adapters spread over the pods
    assert AdapterHomeScorer().score(request(QWEN), pods) == [0.0] * 4


def test_weighted_adapter_targets_split_traffic_as_configured() -> None:
    """A canary between adapters (the seeds' form: 90/10): over 4,000 requests the canary's share is
    within four standard deviations of 10% (binomial: 0.47 points), and the body names the adapter."""
    pool = Pool("ns/p", (8000,), endpoints=(Endpoint("pod", "10.0.0.1", 8000),))
    model = Model("tweets", "ns/p", Criticality.STANDARD, (TargetModel("tweet-summary", 90),
                                                         TargetModel("tweet-summary-canary", 10)))
    config = Config(1, {"ns/p": pool}, {"ns/p": {"tweets": model}})
    intake = Intake(PrefixSettings(), 1 << 20, random.Random(7))
    body = json.dumps({"model": "tweets", "prompt": "summarize"}).encode()
    draws = [intake.read(config, "ns/p", "/v1/completions", body) for _ in range(4000)]
    canary = sum(d.target_model == "tweet-summary-canary" for d in draws) / len(draws)
    assert abs(canary - 0.10) < 4 * (0.1 * 0.9 / len(draws)) ** 0.5
    assert all(json.loads(d.body or b"{}")["model"] == d.target_model for d in draws)
