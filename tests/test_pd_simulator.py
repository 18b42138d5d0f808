"""The simulator's SGLang prefill/decode mode: two real pods on loopback, one per side, talking over HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from simulator.disaggregation import bootstrap_of
from simulator.physics import Physics
from simulator.pod import PodSpec, SimulatedPod
from tests.client import QWEN
from tests.conftest import free_port, own_net

NET = own_net(120, 140) + "0."


@pytest.fixture
async def pd_pods() -> AsyncIterator[tuple[str, str, int]]:
    """A prefill pod and a decode pod (bootstrap timeout 1 s); yields their addresses and the bootstrap port."""
    port, bootstrap_port = free_port(), free_port()
    physics = Physics(time_scale=0.2)
    prefill = SimulatedPod(PodSpec("p", NET + "1", port, "sglang", QWEN, disaggregation="prefill",
                                   bootstrap_port=bootstrap_port, bootstrap_timeout_s=1.0), physics)
    decode = SimulatedPod(PodSpec("d", NET + "2", port, "sglang", QWEN, disaggregation="decode",
                                  bootstrap_port=bootstrap_port, bootstrap_timeout_s=1.0), physics)
    runners, engines = [], []
    assert prefill.bootstrap is not None
    for app, host, p in ((prefill.app(), NET + "1", port), (prefill.bootstrap.app(), NET + "1", bootstrap_port),
                         (decode.app(), NET + "2", port)):
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, host, p).start()
        runners.append(runner)
    engines = [asyncio.create_task(pod.engine.run()) for pod in (prefill, decode)]
    yield f"{NET}1:{port}", f"{NET}2:{port}", bootstrap_port
    for task in engines:
        task.cancel()
    for runner in runners:
        await runner.cleanup()
    assert decode.receiver is not None
    await decode.receiver.close()


def body(room: int, bootstrap_port: int, content: str = "tell me a story", **extra: object) -> dict[str, object]:
    return {"model": QWEN, "messages": [{"role": "user", "content": content}], "max_tokens": 4,
            "bootstrap_host": NET + "1", "bootstrap_port": bootstrap_port, "bootstrap_room": room, **extra}


async def test_the_decode_side_waits_for_its_rooms_prefill_then_answers(pd_pods: tuple[str, str, int]) -> None:
    prefill, decode, bootstrap_port = pd_pods
    async with aiohttp.ClientSession() as http:
        # The decode request arrives first, as it may: it waits for the prefill of its room.
        decoding = asyncio.create_task(http.post(f"http://{decode}/v1/chat/completions", json=body(7, bootstrap_port)))
        await asyncio.sleep(0.2)
        assert not decoding.done()
        async with http.post(f"http://{prefill}/v1/chat/completions", json=body(7, bootstrap_port)) as r:
            assert r.status == 200
            assert (await r.json())["usage"]["completion_tokens"] == 1
        async with await decoding as r:
            assert r.status == 200, await r.text()
            answer = await r.json()
        assert answer["usage"]["completion_tokens"] == 4
        async with http.get(f"http://{decode}/metrics") as r:
            metrics = await r.text()
        assert "sglang:num_decode_transfer_queue_reqs" in metrics and "sglang:kv_transfer_latency_ms" in metrics


async def test_a_missing_prefill_fails_the_decode_request_clearly_after_the_timeout(
        pd_pods: tuple[str, str, int]) -> None:
    _, decode, bootstrap_port = pd_pods
    async with aiohttp.ClientSession() as http:
        started = time.monotonic()
        async with http.post(f"http://{decode}/v1/chat/completions", json=body(8, bootstrap_port)) as r:
            assert r.status == 503
            error = (await r.json())["error"]
        assert 1.0 <= time.monotonic() - started < 3.0
        assert "KV cache transfer failed" in error["message"] and "room 8" in error["message"]
        async with http.get(f"http://{decode}/metrics") as r:
            assert 'sglang:num_transfer_failed_reqs_total{model_name="' in await r.text()


async def test_a_room_whose_prompt_differs_is_refused(pd_pods: tuple[str, str, int]) -> None:
    prefill, decode, bootstrap_port = pd_pods
    async with aiohttp.ClientSession() as http:
        async with http.post(f"http://{prefill}/v1/chat/completions", json=body(9, bootstrap_port, "short")) as r:
            assert r.status == 200
        async with http.post(f"http://{decode}/v1/chat/completions",
                             json=body(9, bootstrap_port, "a much longer prompt than the prefill saw")) as r:
            assert r.status == 503
            assert "not this request's" in (await r.json())["error"]["message"]


async def test_either_side_refuses_a_request_without_bootstrap_fields(pd_pods: tuple[str, str, int]) -> None:
    prefill, decode, _ = pd_pods
    async with aiohttp.ClientSession() as http:
        for pod in (prefill, decode):
            async with http.post(f"http://{pod}/v1/chat/completions",
                                 json={"model": QWEN, "messages": [{"role": "user", "content": "hi"}]}) as r:
                assert r.status == 400
                assert "bootstrap_room" in (await r.json())["error"]["message"]


@pytest.mark.parametrize(("fields", "message"), [
    ({"bootstrap_host": "h", "bootstrap_port": 1}, "`bootstrap_room` is required"),
    ({"bootstrap_host": "", "bootstrap_port": 1, "bootstrap_room": 1}, "bootstrap_host"),
    ({"bootstrap_host": "h", "bootstrap_port": 70000, "bootstrap_room": 1}, "bootstrap_port"),
    ({"bootstrap_host": "h", "bootstrap_port": 1, "bootstrap_room": -1}, "bootstrap_room"),
    ({"bootstrap_host": "h", "bootstrap_port": True, "bootstrap_room": 1}, "bootstrap_port"),
])
def test_malformed_bootstrap_fields_are_named(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bootstrap_of(fields)
    assert bootstrap_of({"model": "m"}) is None
