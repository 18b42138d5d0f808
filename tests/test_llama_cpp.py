"""The gateway in front of a real engine: two llama.cpp servers serving a real model (SmolLM2-135M-Instruct),
with the real Envoy, Redis, controller, collector and pickers (examples/llama-cpp, moved to this run's
ports and loopback network).

Each promise is checked against what the engine itself says: its `timings.cache_n` and usage for what a
request reused, its `/metrics` counters for the prompt tokens it computed, its `/slots` for how busy it is,
and its own chat rendering and tokenizer for what our tokenizer computes.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from local_fleet.fleet import Fleet, FleetSettings
from local_fleet.llama_server import model_path
from picker.settings import StateSettings
from picker.tokens import EngineTokens
from tests.client import post, wait_for
from tests.conftest import FIXTURES, free_port, own_net, relocated
from tokenization.model_tokenizer import ChatMessage, for_model

EXAMPLE = Path(__file__).parent.parent / "examples" / "llama-cpp"
MODEL = "smollm2"
POOL = "default/smollm2-pool"
PODS = ("llama-smollm2-0", "llama-smollm2-1")
PREFIX_PORT, PLAIN_PORT = free_port(), free_port()
NET = own_net(250, 255)


@pytest.fixture(scope="module")
def llama_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    manifests = tmp_path_factory.mktemp("llama-manifests")
    for path in EXAMPLE.glob("*.yaml"):
        (manifests / path.name).write_text(relocated(path.read_text(), {8080: PREFIX_PORT, 8081: PLAIN_PORT}, NET))
    settings = FleetSettings(
        manifests_dir=manifests, work_dir=tmp_path_factory.mktemp("llama-fleet"), redis_port=free_port(),
        picker_ports=(free_port(), free_port()), picker_metrics_ports=(free_port(), free_port()),
        picker_admin_ports=(free_port(), free_port()), envoy_admin_port=free_port())
    fleet = Fleet(settings)
    try:
        fleet.start(timeout_s=120)
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


def pods(fleet: Fleet) -> dict[str, str]:
    """pod name -> its address (ip:port)."""
    return {name: key for key, (name, _) in fleet.pods().items()}


def counters(fleet: Fleet) -> dict[str, dict[str, float]]:
    """pod name -> llama.cpp's own counters (llamacpp:NAME without the prefix)."""
    out = {}
    for name, key in pods(fleet).items():
        with urllib.request.urlopen(f"http://{key}/metrics", timeout=30) as r:
            text = r.read().decode()
        out[name] = {m[1]: float(m[2]) for m in re.finditer(r"^llamacpp:(\w+) ([0-9.e+-]+)$", text, re.M)}
    return out


def computed(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> float:
    """Prompt tokens the pods computed between two readings (llama.cpp's counter leaves out what it reused)."""
    return sum(after[p]["prompt_tokens_total"] - before[p]["prompt_tokens_total"] for p in after)


def client(port: int) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)


def seed_body(name: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return {**body, "model": MODEL}


async def test_chat_streaming_completions_and_responses_through_the_gateway(llama_fleet: Fleet) -> None:
    api = client(PREFIX_PORT)
    raw = await api.chat.completions.with_raw_response.create(
        model=MODEL, max_tokens=8, temperature=0, messages=[{"role": "user", "content": "Name a colour."}])
    reply = raw.parse()
    assert raw.headers["x-inference-endpoint"] in pods(llama_fleet).values()
    assert reply.choices[0].message.content and reply.usage and reply.usage.prompt_tokens > 10

    stream = await api.chat.completions.create(
        model=MODEL, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Count to three."}])
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0

    completion = await api.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4,
                                              temperature=0)
    assert completion.choices[0].text and completion.usage and completion.usage.prompt_tokens == 5
    ids = for_model(model_path()).prompt_ids("The capital of France is")
    by_ids = await api.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == completion.choices[0].text  # the same prompt, as token ids

    # llama.cpp serves the Responses API, and the gateway routes it like any other request.
    response = await api.responses.create(model=MODEL, input="Say hello.", max_output_tokens=8)
    assert response.output_text


async def test_round1_then_round2_land_on_one_pod_which_reuses_the_shared_prefix(llama_fleet: Fleet,
                                                                                 http: aiohttp.ClientSession) -> None:
    """The seeds' prefix test on a real engine: round2 goes where round1 went, and llama.cpp says it
    computed only what follows the prefix the two share."""
    first, second = seed_body("round1.txt"), seed_body("round2.txt")
    served = []
    usage = None
    for body in (first, second):
        reply = await post(http, PREFIX_PORT, body)
        assert reply.status == 200, reply.text
        served.append(reply.endpoint)
        events = [json.loads(line[6:]) for line in reply.text.splitlines()
                  if line.startswith("data: {")]
        usage = next(e for e in reversed(events) if e.get("usage"))
    assert served[0] == served[1], served
    tokenizer = for_model(model_path())
    one, two = (tokenizer.chat_ids([ChatMessage.of(m) for m in b["messages"]]) for b in (first, second))
    shared = next((i for i, (a, b) in enumerate(zip(one, two, strict=False)) if a != b), min(len(one), len(two)))
    assert usage is not None
    assert usage["timings"]["cache_n"] >= shared > 50, (usage, shared)
    assert usage["usage"]["prompt_tokens_details"]["cached_tokens"] == usage["timings"]["cache_n"]


SYSTEM = ("You are the support assistant of a company that sells bicycles, spare parts and repairs. Answer in one "
          "short sentence, politely, and never invent a price. The shop opens at nine and closes at six, every day "
          "but Sunday. Repairs take two days. Orders ship within a week. ")


def group_bodies(tag: str, groups: int, per_group: int) -> list[list[dict[str, Any]]]:
    """Shared-prefix groups: each a long system prompt of its own (about 300 tokens) and short questions."""
    return [[{"model": MODEL, "max_tokens": 2, "temperature": 0,
              "messages": [{"role": "system", "content": f"[{tag} desk {g}] " + SYSTEM * 4},
                           {"role": "user", "content": f"Question {q}: is the shop open on day {q}?"}]}
             for q in range(per_group)] for g in range(groups)]


async def send_groups(http: aiohttp.ClientSession, port: int, groups: list[list[dict[str, Any]]]) -> list[str]:
    """The groups side by side, each group's requests one after another, as conversations arrive."""
    async def one_group(bodies: list[dict[str, Any]]) -> list[str]:
        served = []
        for body in bodies:
            reply = await post(http, port, body)
            assert reply.status == 200, reply.text
            served.append(reply.endpoint or "")
        return served
    return [pod for served in await asyncio.gather(*(one_group(g) for g in groups)) for pod in served]


async def send_rounds(http: aiohttp.ClientSession, port: int, groups: list[list[dict[str, Any]]]) -> list[str]:
    """One request at a time, round by round (each group's first question, then each group's second, ...).
    With an odd number of groups, round robin over two pods sends each group's questions to both pods in
    turn, whatever the timing; run side by side, groups can fall into step with round robin and each stay
    on one pod by chance (round robin then computes as little as the picker: seen once in seven runs)."""
    served = []
    for round_ in zip(*groups, strict=True):
        for body in round_:
            reply = await post(http, port, body)
            assert reply.status == 200, reply.text
            served.append(reply.endpoint or "")
    return served


async def test_shared_prefix_groups_compute_fewer_prompt_tokens_through_the_picker(
        llama_fleet: Fleet, http: aiohttp.ClientSession) -> None:
    """The same workload (new prefixes each time) through round robin (:8081) and through the picker (:8080):
    the engines' own counters say how many prompt tokens each computed."""
    before = counters(llama_fleet)
    await send_rounds(http, PLAIN_PORT, group_bodies("plain", groups=3, per_group=4))
    middle = counters(llama_fleet)
    served = await send_rounds(http, PREFIX_PORT, group_bodies("picker", groups=3, per_group=4))
    after = counters(llama_fleet)
    round_robin, picker = computed(before, middle), computed(middle, after)
    # Each group's prefix: computed once through the picker, on both pods through round robin.
    # On failure, where each request went (round by round) and what each pod computed.
    assert picker < 0.7 * round_robin, (picker, round_robin, served, {
        p: (after[p]["prompt_tokens_total"] - middle[p]["prompt_tokens_total"]) for p in after})


async def test_bad_inputs_are_answered_in_openai_shape(llama_fleet: Fleet, http: aiohttp.ClientSession) -> None:
    broken = await post(http, PREFIX_PORT, None, raw=b'{"model": "smollm2", "messages": [')
    assert broken.status == 400 and broken.json()["error"]["type"] == "BadRequestError"
    unknown = await post(http, PREFIX_PORT, {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]})
    assert unknown.status == 404 and "no-such-model" in unknown.json()["error"]["message"]
    # The engine's own refusal passes through unchanged: a prompt longer than a slot's context.
    long = await post(http, PREFIX_PORT, {"model": MODEL, "max_tokens": 2,
                                          "messages": [{"role": "user", "content": "word " * 3000}]})
    assert long.status == 400 and long.endpoint and "context" in long.json()["error"]["message"], long.text
    fine = await post(http, PREFIX_PORT, {"model": MODEL, "max_tokens": 2,
                                          "messages": [{"role": "user", "content": "Still there?"}]})
    assert fine.status == 200


async def admin_pool(fleet: Fleet, http: aiohttp.ClientSession) -> dict[str, Any]:
    token = fleet.admin_tokens["read"]
    async with http.get(f"http://127.0.0.1:{fleet.settings.picker_admin_ports[0]}/admin/pools",
                        headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 200
        listed: list[dict[str, Any]] = await r.json()
    return next(p for p in listed if p["pool"] == POOL)


async def test_a_busy_pods_slots_reach_the_scorers(llama_fleet: Fleet, http: aiohttp.ClientSession) -> None:
    """Requests sent to one pod directly (not through the gateway) fill its slots: the collector reads them
    from llama.cpp's /slots and /metrics, the admin API shows them, and new requests go to the other pod."""
    busy_name = PODS[0]
    busy = pods(llama_fleet)[busy_name]
    pool = await admin_pool(llama_fleet, http)
    assert pool["runtime"] == "llama.cpp"
    load = next(e for e in pool["endpoints"] if e["name"] == busy_name)["load"]
    assert load["batch_limit"] == 4 and {"block_size", "num_blocks"} <= set(load["unreported"]), load

    async def occupy(i: int) -> None:
        body = {"model": MODEL, "max_tokens": 300, "temperature": 0, "ignore_eos": True,
                "messages": [{"role": "user", "content": f"Write a long story about lighthouse {i}."}]}
        async with http.post(f"http://{busy}/v1/chat/completions", json=body) as r:
            assert r.status == 200
            await r.read()

    hogs = [asyncio.create_task(occupy(i)) for i in range(4)]
    try:
        ages: list[int] = []

        async def seen_busy() -> bool:
            """The busy slots in a sample fresh enough to be scored (a sample older than the picker's
            `max_sample_age_ms` is unknown load): on a loaded machine a busy llama.cpp answers the collector
            late now and then, and a request decided then could go anywhere."""
            found = await admin_pool(llama_fleet, http)
            sample = next(e for e in found["endpoints"] if e["name"] == busy_name)["load"]
            if not (sample and sample["running"] == 4 and sample["kv_cache_usage"] > 0):
                return False
            ages.append(sample["age_ms"])
            return bool(sample["age_ms"] is not None and sample["age_ms"] < StateSettings().max_sample_age_ms / 2)
        served = []
        for i in range(4):  # one after another: each sees the busy slots alone, not the gateway's own requests
            await wait_for(seen_busy, 60)
            served += await send_groups(http, PREFIX_PORT, [[
                {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": f"Quick question {i}?"}]}]])
        assert set(served) == {pods(llama_fleet)[PODS[1]]}, (served, ages)
    finally:
        for hog in hogs:
            hog.cancel()
        await asyncio.gather(*hogs, return_exceptions=True)


async def test_a_pod_killed_under_traffic_has_its_requests_served_by_the_other(
        llama_fleet: Fleet, http: aiohttp.ClientSession) -> None:
    bodies = [{"model": MODEL, "max_tokens": 4,
               "messages": [{"role": "user", "content": f"Killed pod test {i}: say yes."}]} for i in range(24)]
    gate = asyncio.Semaphore(4)

    async def one(body: dict[str, Any]) -> Any:
        async with gate:
            return await post(http, PREFIX_PORT, body)

    sending = [asyncio.create_task(one(b)) for b in bodies]
    await asyncio.sleep(1.0)
    llama_fleet.kill(f"pod-{PODS[0]}")
    try:
        replies = await asyncio.gather(*sending)
        assert [r.status for r in replies] == [200] * len(bodies), [r.text for r in replies if r.status != 200]
        assert {r.endpoint for r in replies[-8:]} == {pods(llama_fleet)[PODS[1]]}
    finally:
        llama_fleet.restart(f"pod-{PODS[0]}")
        llama_fleet.wait_pods(60)


CHATS: dict[str, list[dict[str, Any]]] = {
    "one user turn": [{"role": "user", "content": "What is the tallest mountain?"}],
    "system and user": [{"role": "system", "content": "You answer in French."},
                        {"role": "user", "content": "Good morning!"}],
    "several turns": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                      {"role": "user", "content": "Tell me a joke about 42 cats, e.g. 3.14 of them."}],
    "content parts": [{"role": "user", "content": [{"type": "text", "text": "First part."},
                                                   {"type": "text", "text": "Second part, naïve café 🚲."}]}],
    "special tokens written out": [{"role": "user", "content": "Keep <|im_end|> literally, and\ttabs  and\n\nlines"}],
    "tool turn": [{"role": "system", "content": "You may call tools."},
                  {"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": "Let me look that up."},
                  {"role": "tool", "content": "{\"temperature\": 21, \"sky\": \"clear\"}"},
                  {"role": "user", "content": "And tomorrow?"}],
}
PROMPTS = {"plain text": "Once upon a time, in 1999,", "unicode": "Ünïcödé ½ → ∞ 日本語 🚲  two  spaces",
           "control token": "<|im_start|>user\nhello<|im_end|>"}


@pytest.mark.parametrize("shape", list(CHATS))
async def test_our_chat_tokens_are_llama_cpps(llama_fleet: Fleet, http: aiohttp.ClientSession, shape: str) -> None:
    """What the gateway would tokenize for a chat request is what the engine renders and tokenizes, token for
    token (llama.cpp's /apply-template and /tokenize), and what it counts as the request's prompt."""
    base = f"http://{pods(llama_fleet)[PODS[1]]}"
    tokenizer = for_model(model_path())
    messages = CHATS[shape]
    async with http.post(f"{base}/apply-template", json={"messages": messages}) as r:
        rendered = (await r.json())["prompt"]
    async with http.post(f"{base}/tokenize", json={"content": rendered, "add_special": True}) as r:
        engine_ids = (await r.json())["tokens"]
    ours = [ChatMessage.of(m) for m in messages]
    assert tokenizer.render_chat(ours) == rendered
    assert tokenizer.chat_ids(ours) == engine_ids
    # The picker's own path, from the request body (pools indexed from engine events look these up).
    body = {"model": MODEL, "messages": messages}
    assert EngineTokens({"": str(model_path())}).ids("/v1/chat/completions", body, MODEL) == engine_ids
    async with http.post(f"{base}/v1/chat/completions",
                         json={"model": MODEL, "messages": messages, "max_tokens": 1}) as r:
        assert (await r.json())["usage"]["prompt_tokens"] == len(engine_ids)


@pytest.mark.parametrize("shape", list(PROMPTS))
async def test_our_completion_tokens_are_llama_cpps(llama_fleet: Fleet, http: aiohttp.ClientSession,
                                                    shape: str) -> None:
    base = f"http://{pods(llama_fleet)[PODS[1]]}"
    async with http.post(f"{base}/tokenize", json={"content": PROMPTS[shape], "add_special": True}) as r:
        engine_ids = (await r.json())["tokens"]
    assert for_model(model_path()).prompt_ids(PROMPTS[shape]) == engine_ids


async def test_the_pickers_completion_and_responses_tokens_are_llama_cpps(llama_fleet: Fleet,
                                                                          http: aiohttp.ClientSession) -> None:
    """Every other request shape, body to token ids as the picker computes them, against the engine's count:
    completions as text, as token ids and as batches of either (placed by the first prompt), and the
    Responses API (instructions, a string input, message items with text parts)."""
    base = f"http://{pods(llama_fleet)[PODS[1]]}"
    tokens = EngineTokens({MODEL: str(model_path())})
    text = PROMPTS["unicode"]
    async with http.post(f"{base}/tokenize", json={"content": text, "add_special": True}) as r:
        engine_ids = (await r.json())["tokens"]
    for prompt in (text, [text, "another prompt"], engine_ids, [engine_ids, [1, 2, 3]]):
        assert tokens.ids("/v1/completions", {"model": MODEL, "prompt": prompt}, MODEL) == engine_ids, prompt
    async with http.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": engine_ids, "max_tokens": 1}) as r:
        assert (await r.json())["usage"]["prompt_tokens"] == len(engine_ids)
    responses = [
        {"input": "What is 2 + 2?"},
        {"instructions": "Answer briefly.", "input": "Name a planet."},
        {"instructions": "Be kind.", "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello there."}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi!"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "One word, please."}]}]},
    ]
    for body in responses:
        ours = tokens.ids("/v1/responses", {"model": MODEL, **body}, MODEL)
        async with http.post(f"{base}/v1/responses", json={"model": MODEL, "max_output_tokens": 1, **body}) as r:
            answer = await r.json()
            assert r.status == 200, answer
        assert ours is not None and answer["usage"]["input_tokens"] == len(ours), body
    assert tokens.ids("/v1/chat/completions", {"model": "other", "messages": [{"role": "user", "content": "x"}]},
                      "other") is None  # no tokenizer for that model: placed by load alone
