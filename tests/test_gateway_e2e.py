"""End to end through the real Envoy, pickers, Redis, collector, controller and simulated pods."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest
from redis.asyncio import Redis

from gateway_state.lifecycle import connect
from gateway_state.store import StateStore
from local_fleet.fleet import Fleet
from tests.client import QWEN, chat, post, spread, wait_for
from tests.conftest import DEFAULT_PORT, FIXTURES, GHOST_PORT, PLAIN_PORT, PREFIX_PORT, pod_address

PREFIX_PODS = {f"prefix-{i}" for i in range(4)}
DEFAULT_PODS = {f"default-{i}" for i in range(4)}


@pytest.fixture
async def http(fleet: Fleet) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


def handled_lines(fleet: Fleet, request_id: str) -> list[str]:
    return [line for name in ("picker-0", "picker-1") for line in fleet.log_path(name).read_text().splitlines()
            if "Request Handled" in line and f"request_id={request_id}" in line]


async def snapshot_refreshes(http: aiohttp.ClientSession, metrics_port: int) -> float:
    async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
        text = await r.text()
    return float(re.search(r"^picker_snapshot_refreshes_total (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]


def sse_events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


async def test_seed_curl_example_returns_a_chat_completion(http: aiohttp.ClientSession) -> None:
    reply = await post(http, PREFIX_PORT, chat("Hello, this is a test", max_tokens=50))
    assert reply.status == 200, reply.text
    body = reply.json()
    assert body["object"] == "chat.completion" and body["model"] == QWEN
    assert body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] == 50
    assert reply.pod in PREFIX_PODS


async def test_streaming_returns_chunks_usage_and_done(http: aiohttp.ClientSession) -> None:
    reply = await post(http, PREFIX_PORT, chat("Stream please", max_tokens=5, stream=True,
                                               stream_options={"include_usage": True}))
    assert reply.status == 200
    events = sse_events(reply.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content.strip()
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5


async def test_seed_round1_then_round2_reach_the_same_pod(http: aiohttp.ClientSession, fleet: Fleet) -> None:
    ids, pods = [], []
    for name in ("round1.txt", "round2.txt"):
        rid = str(uuid.uuid4())
        async with http.post(f"http://127.0.0.1:{PREFIX_PORT}/v1/chat/completions",
                             data=(FIXTURES / name).read_bytes(),
                             headers={"Content-Type": "application/json", "x-request-id": rid}) as r:
            assert r.status == 200
            pods.append(r.headers["x-inference-pod"])
            events = sse_events(await r.text())
        ids.append(rid)
    assert pods[0] == pods[1]
    # The pod's own KV cache served round2's shared prefix.
    assert json.loads(events[-2])["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    await wait_for(lambda: all(handled_lines(fleet, rid) for rid in ids), 5.0)  # logged as they are routed
    logged = [re.search(r" pod=(\S+)", handled_lines(fleet, rid)[0]).group(1) for rid in ids]  # type: ignore[union-attr]
    assert logged == pods
    assert "prefix_blocks=0/" not in handled_lines(fleet, ids[1])[0]


async def test_distinct_prefixes_spread_over_every_pod(http: aiohttp.ClientSession) -> None:
    bodies = [chat(f"Conversation {i}: {uuid.uuid4().hex} " + "tell me a story " * 20, max_tokens=16)
              for i in range(50)]
    served, replies = await spread(http, PREFIX_PORT, bodies, concurrency=10)
    assert all(r.status == 200 for r in replies)
    assert set(served) == PREFIX_PODS, served  # never the pod that is not ready
    assert min(served.values()) >= 3, served


async def test_default_pool_sends_fewer_requests_to_a_loaded_pod(http: aiohttp.ClientSession, fleet: Fleet) -> None:
    loaded = pod_address("127.0.2.1:8000")  # default-0
    async with http.post(f"http://{loaded}/sim/load", json={"requests": 300, "prompt_tokens": 1000}) as r:
        assert r.status == 200
    store = StateStore(connect(fleet.redis_url))
    try:
        async def backlog_published() -> bool:
            load = (await store.read_snapshot(["default/default-pool"])).load
            sample = load.get("default/default-pool", {}).get(loaded)
            return sample is not None and sample.waiting >= 5

        await wait_for(backlog_published, 5.0)  # the collector has published it...
        seen = [await snapshot_refreshes(http, port) for port in fleet.settings.picker_metrics_ports]

        async def read_by_every_picker() -> bool:  # ...and every picker has refreshed its snapshot since
            now = [await snapshot_refreshes(http, port) for port in fleet.settings.picker_metrics_ports]
            return all(n > s for n, s in zip(now, seen, strict=True))

        await wait_for(read_by_every_picker, 5.0)
        bodies = [chat(f"question {i}", model="qwen-default", max_tokens=24) for i in range(200)]
        served, replies = await spread(http, DEFAULT_PORT, bodies, concurrency=200)
    finally:
        await store.redis.aclose()
        async with http.delete(f"http://{loaded}/sim/load") as r:
            assert r.status == 200
    assert all(r.status == 200 for r in replies)
    others = [served[p] for p in DEFAULT_PODS - {"default-0"}]
    assert served["default-0"] < 0.5 * min(others), served


async def test_the_openai_client_works(fleet: Fleet) -> None:
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{PREFIX_PORT}/v1", api_key="unused", max_retries=0)
    try:
        completion = await client.chat.completions.create(
            model=QWEN, messages=[{"role": "user", "content": "Hi there"}], max_tokens=6)
        assert completion.choices[0].message.content and completion.usage.completion_tokens == 6
        stream = await client.chat.completions.create(
            model=QWEN, messages=[{"role": "user", "content": "Stream"}], max_tokens=4, stream=True,
            stream_options={"include_usage": True})
        pieces, usage = [], None
        async for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
            if chunk.usage:
                usage = chunk.usage
        assert "".join(pieces).strip() and usage is not None and usage.completion_tokens == 4
        text = await client.completions.create(model=QWEN, prompt="Once upon a time", max_tokens=5)
        assert text.choices[0].text and text.usage.completion_tokens == 5
        models = await client.models.list()
        assert [m.id for m in models.data] == [QWEN]
    finally:
        await client.close()


BAD_INPUTS = [
    ("invalid-json", "POST", b'{"model": "/models/Qwen3-32B", "messages": [', 400, "BadRequestError"),
    ("missing-model", "POST", b'{"messages": [{"role": "user", "content": "hi"}]}', 400, "BadRequestError"),
    ("unknown-model", "POST", b'{"model": "gpt-17", "messages": [{"role": "user", "content": "hi"}]}', 404,
     "NotFoundError"),
    ("over-limit", "POST", b'{"model": "/models/Qwen3-32B", "prompt": "' + b"x" * (9 * 1024 * 1024) + b'"}', 413,
     "BadRequestError"),
    ("wrong-method", "PUT", b'{"model": "/models/Qwen3-32B"}', 405, "MethodNotAllowedError"),
    ("non-utf8", "POST", b'{"model": "/models/Qwen3-32B", "prompt": "\xff\xfe"}', 400, "BadRequestError"),
    ("empty-body", "POST", b"", 400, "BadRequestError"),
    ("not-an-object", "POST", b"[1, 2, 3]", 400, "BadRequestError"),
]


@pytest.mark.parametrize(("case", "method", "raw", "status", "error_type"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
async def test_bad_input_gets_an_openai_error_and_breaks_nothing(
        http: aiohttp.ClientSession, case: str, method: str, raw: bytes, status: int, error_type: str) -> None:
    reply = await post(http, PREFIX_PORT, None, raw=raw, method=method)
    assert reply.status == status, reply.text[:300]
    error = reply.json()["error"]
    assert error["type"] == error_type and error["code"] == status and error["message"]
    good = await post(http, PREFIX_PORT, chat("still fine?"))
    assert good.status == 200


async def test_weighted_target_models_rewrite_the_body(http: aiohttp.ClientSession) -> None:
    bodies = [chat(f"canary {i}", model="qwen-canary", max_tokens=2) for i in range(40)]
    _, replies = await spread(http, DEFAULT_PORT, bodies, concurrency=8)
    assert all(r.status == 200 for r in replies)
    served_models = [r.json()["model"] for r in replies]
    assert set(served_models) == {"adapter-a", "adapter-b"}
    assert min(served_models.count("adapter-a"), served_models.count("adapter-b")) >= 8


async def test_request_mirror_copies_traffic_to_the_mirror_service(http: aiohttp.ClientSession) -> None:
    async def mirrored_prompt_tokens() -> float:
        async with http.get(f"http://{pod_address('127.0.3.1:8000')}/metrics") as r:
            text = await r.text()
        return float(re.search(r"^vllm:prompt_tokens_total\{.*\} (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]

    before = await mirrored_prompt_tokens()
    reply = await post(http, DEFAULT_PORT, chat("mirror me", model="qwen-default"))
    assert reply.status == 200 and reply.pod in DEFAULT_PODS  # the client sees the pool's answer
    async def mirrored() -> bool:
        return await mirrored_prompt_tokens() > before

    await wait_for(mirrored, 5.0)


async def test_plain_route_round_robins_over_the_same_pods(http: aiohttp.ClientSession) -> None:
    served, replies = await spread(http, PLAIN_PORT, [chat(f"plain {i}") for i in range(12)], concurrency=1)
    assert all(r.status == 200 for r in replies)
    assert set(served) == PREFIX_PODS


async def test_picker_metrics_count_requests_and_decisions(http: aiohttp.ClientSession, fleet: Fleet) -> None:
    await post(http, PREFIX_PORT, chat("count me"))
    text = ""
    for port in fleet.settings.picker_metrics_ports:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
            text += await r.text()
    assert re.search(r'picker_requests_total\{endpoint="prefix-\d",model="/models/Qwen3-32B",'
                     r'pool="default/prefix-pool",result="routed"\} [1-9]', text)
    assert 'picker_decision_seconds_count{pool="default/prefix-pool",strategy="PREFIX_CACHE"}' in text
    assert 'picker_prefix_blocks_matched_total{pool="default/prefix-pool"}' in text
    assert re.search(r'picker_requests_total\{endpoint="",model="",pool="default/prefix-pool",result="404"\} [1-9]',
                     text)


async def test_on_a_cluster_the_state_spreads_over_the_masters(http: aiohttp.ClientSession, fleet: Fleet) -> None:
    if not fleet.settings.redis_cluster_ports:
        pytest.skip("standalone Redis")
    # Prompts that differ from their first block: their index entries go to different buckets.
    for i in range(12):
        assert (await post(http, PREFIX_PORT, chat(f"Spread {i}: " + "tell me about the tides. " * 12))).status == 200
    per_node, index_per_node = {}, {}
    for port in fleet.settings.redis_cluster_ports:
        node = Redis(port=port)
        per_node[port] = await node.dbsize()
        index_per_node[port] = len(await node.keys("gw:{default/prefix-pool|b*}:pfx:*"))
        await node.aclose()
    # Config, collectors and each pool hash to their own slots, over at least two masters.
    assert sum(1 for n in per_node.values() if n > 0) >= 2, per_node
    # One pool's prefix index, too, is on more than one master.
    assert sum(1 for n in index_per_node.values() if n > 0) >= 2, index_per_node


async def test_an_unreachable_pod_gets_an_openai_shaped_503(http: aiohttp.ClientSession) -> None:
    # ghost-0 is declared ready but nothing listens there: Envoy's connect failure, reshaped.
    reply = await post(http, GHOST_PORT, chat("anyone there?", model="ghost-model"))
    assert reply.status == 503
    error = reply.json()["error"]
    assert error["type"] == "ServiceUnavailableError" and error["code"] == 503
    assert error["message"].startswith("The model server did not answer")
