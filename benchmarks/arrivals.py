"""Open-loop Poisson arrivals and closed-loop concurrency over conversations, recording every prompt."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from benchmarks.driver import Result, chat_once
from benchmarks.workloads import Conversation
from simulator.block_hashes import VllmHashes, extend_chain
from simulator.tokenizer import render_chat, tokenize


@dataclass(frozen=True)
class Sent:
    prompt: str  # the prompt as the model server renders it, for the oracle
    result: Result


@dataclass(frozen=True)
class Arrivals:
    sent: list[Sent]
    dropped: int  # arrivals that found every conversation mid-turn: the load the router could not absorb


async def poisson(base_url: str, model: str, conversations: list[Conversation], qps: float, duration_s: float,
                  max_tokens: int, seed: int) -> Arrivals:
    """Turns arrive as a Poisson process; each goes to an idle conversation with turns left, chosen at random.

    Arrival times and choices come from separate generators, so every router sees
    the same arrival times whatever its latencies do to the set of idle users.
    """
    times, choices = random.Random(seed), random.Random(seed + 1)
    url = base_url.rstrip("/") + "/v1/chat/completions"
    idle: list[tuple[Conversation, int]] = [(c, 0) for c in conversations]
    sent: list[Sent] = []
    dropped = 0
    tasks: set[asyncio.Task[None]] = set()
    start = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        async def turn(conv: Conversation, t: int) -> None:
            conv.messages.append({"role": "user", "content": conv.questions[t]})
            prompt = render_chat(conv.messages)
            sent.append(Sent(prompt, await chat_once(http, url, model, conv, max_tokens)))
            if t + 1 < len(conv.questions):
                idle.append((conv, t + 1))

        at = 0.0
        while True:
            at += times.expovariate(qps)
            if at >= duration_s:
                break
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            if not idle:
                dropped += 1
                continue
            task = asyncio.create_task(turn(*idle.pop(choices.randrange(len(idle)))))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    return Arrivals(sent, dropped)


async def concurrent(base_url: str, model: str, conversations: list[Conversation], concurrency: int,
                     max_tokens: Callable[[], int]) -> Arrivals:
    """Single-turn requests, at most `concurrency` at once (the seeds' --max-concurrency)."""
    gate = asyncio.Semaphore(concurrency)
    url = base_url.rstrip("/") + "/v1/chat/completions"
    sent: list[Sent] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1200)) as http:
        async def one(conv: Conversation) -> None:
            async with gate:
                conv.messages.append({"role": "user", "content": conv.questions[0]})
                prompt = render_chat(conv.messages)
                sent.append(Sent(prompt, await chat_once(http, url, model, conv, max_tokens())))

        await asyncio.gather(*(one(c) for c in conversations))
    return Arrivals(sent, 0)


def oracle_hit_rate(prompts: list[str], block_size: int = 16) -> float:
    """The hit rate an unlimited cache with perfect affinity would reach: the fraction of prompt
    tokens in full blocks that repeat an earlier prompt's prefix (the last token is always computed)."""
    seen: set[bytes] = set()
    hits = total = 0
    hasher = VllmHashes(seed="0")
    for prompt in prompts:
        tokens = tokenize(prompt)
        total += len(tokens)
        matched, chain = 0, list[bytes]()
        extend_chain(chain, tokens, block_size, hasher)
        for h in chain[: (len(tokens) - 1) // block_size]:
            if h not in seen:
                break
            matched += 1
        hits += matched * block_size
        seen.update(chain)
    return hits / total if total else 0.0
