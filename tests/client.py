"""A small HTTP client for the gateway's OpenAI surface, used by the end-to-end tests."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

QWEN = "/models/Qwen3-32B"


@dataclass
class Reply:
    status: int
    pod: str | None  # the pod's name, as simulated pods say it (x-inference-pod)
    text: str
    endpoint: str | None = None  # the address that served it, as Envoy says it for any engine (x-inference-endpoint)

    def json(self) -> Any:
        return json.loads(self.text)


async def post(session: aiohttp.ClientSession, port: int, body: Any, path: str = "/v1/chat/completions",
               raw: bytes | None = None, method: str = "POST") -> Reply:
    data = raw if raw is not None else json.dumps(body).encode()
    async with session.request(method, f"http://127.0.0.1:{port}{path}", data=data,
                               headers={"Content-Type": "application/json"}) as r:
        return Reply(r.status, r.headers.get("x-inference-pod"), await r.text(), r.headers.get("x-inference-endpoint"))


def chat(content: str, model: str = QWEN, max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **extra}


async def spread(session: aiohttp.ClientSession, port: int, bodies: list[dict[str, Any]],
                 concurrency: int) -> tuple[Counter[str], list[Reply]]:
    """Send bodies with bounded concurrency; count which pod served each."""
    gate = asyncio.Semaphore(concurrency)

    async def one(body: dict[str, Any]) -> Reply:
        async with gate:
            return await post(session, port, body)

    replies = await asyncio.gather(*(one(b) for b in bodies))
    return Counter(r.pod for r in replies if r.status == 200 and r.pod), list(replies)


async def wait_for(condition: Callable[[], Awaitable[bool] | bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        met = condition()
        if inspect.isawaitable(met):
            met = await met
        if met:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.05)
