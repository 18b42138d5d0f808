"""Drives conversations through a router and measures what the client sees."""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import time
from dataclasses import dataclass

import aiohttp

from benchmarks.workloads import Conversation


@dataclass(frozen=True)
class Result:
    ok: bool
    ttft_s: float
    latency_s: float
    output_tokens: int
    pod: str | None
    finished_at: float
    error: str = ""


async def chat_once(http: aiohttp.ClientSession, url: str, model: str, conv: Conversation, max_tokens: int) -> Result:
    """One streamed turn; the answer joins the conversation's history."""
    started = time.monotonic()
    ttft, pieces, pod = None, [], None
    body = {"model": model, "messages": conv.messages, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    try:
        async with http.post(url, json=body) as r:
            pod = r.headers.get("x-inference-pod") or r.headers.get("x-inference-endpoint")
            if r.status != 200:
                text = (await r.read()).decode("utf-8", "replace")
                return Result(False, 0.0, time.monotonic() - started, 0, pod, time.monotonic(),
                              f"{r.status} {text[:200]}")
            async for line in r.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices", []):
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        ttft = ttft if ttft is not None else time.monotonic() - started
                        pieces.append(piece)
    except (TimeoutError, aiohttp.ClientError) as exc:
        return Result(False, 0.0, time.monotonic() - started, 0, pod, time.monotonic(), repr(exc)[:200])
    conv.messages.append({"role": "assistant", "content": "".join(pieces)})
    now = time.monotonic()
    return Result(True, ttft if ttft is not None else now - started, now - started, len(pieces), pod, now)


async def idle_ttft_s(base_url: str, model: str, requests: int = 30, warm_up: int = 30) -> float:
    """Median time to first token of short requests sent one at a time to idle pods.

    Against the same figure sent straight to a pod, this is the router's own cost
    per request: what it adds to every first token before any scheduling gain.
    The first `warm_up` answers are not counted: a router's first requests to
    each pod open connections (about 4 ms more through Envoy to 8 pods).
    """
    url = base_url.rstrip("/") + "/v1/chat/completions"
    ttfts = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        for i in range(warm_up + requests):
            conv = Conversation(0, 0, "", [f"ping {i % 4}"])
            conv.messages = [{"role": "user", "content": conv.questions[0]}]
            result = await chat_once(http, url, model, conv, 1)
            if not result.ok:
                raise RuntimeError(f"idle probe through {base_url} failed: {result.error}")
            ttfts.append(result.ttft_s)
    return statistics.median(ttfts[warm_up:])


async def run_turns(base_url: str, model: str, conversations: list[Conversation], turns: range, concurrency: int,
                    max_tokens: int, deadline_s: float | None = None) -> list[Result]:
    """Each conversation takes its turns in order; at most `concurrency` requests at once.

    With a deadline, conversations stop starting turns once it passes.
    """
    gate = asyncio.Semaphore(concurrency)
    results: list[Result] = []
    url = base_url.rstrip("/") + "/v1/chat/completions"
    stop_at = time.monotonic() + deadline_s if deadline_s else None

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
        async def converse(conv: Conversation) -> None:
            for t in turns:
                if stop_at is not None and time.monotonic() >= stop_at:
                    return
                conv.messages.append({"role": "user", "content": conv.questions[t]})
                async with gate:
                    results.append(await chat_once(http, url, model, conv, max_tokens))

        await asyncio.gather(*(converse(c) for c in conversations))
    return results


_COUNTERS = {
    "vllm": (r"^vllm:prefix_cache_hits_total\{.*\} (\S+)$", r"^vllm:prefix_cache_queries_total\{.*\} (\S+)$"),
    "sglang": (r"^sglang:cached_tokens_total\{.*\} (\S+)$", r"^sglang:prompt_tokens_total\{.*\} (\S+)$"),
}


async def prefix_counters(pods: list[str]) -> tuple[float, float]:
    """Prefix-cache hit and query tokens summed over the pods, from their own /metrics."""
    hits = queries = 0.0
    async with aiohttp.ClientSession() as http:
        for pod in pods:
            async with http.get(f"http://{pod}/metrics") as r:
                text = await r.text()
            for hit_re, query_re in _COUNTERS.values():
                h, q = re.search(hit_re, text, re.M), re.search(query_re, text, re.M)
                if h and q:
                    hits += float(h.group(1))
                    queries += float(q.group(1))
    return hits, queries


def hit_rate(before: tuple[float, float], after: tuple[float, float]) -> float:
    queried = after[1] - before[1]
    return (after[0] - before[0]) / queried if queried else 0.0
