"""The simulator's physics: continuous batching, a prefix cache with LRU eviction, preemption."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from simulator.engine import Engine, Sequence
from simulator.kv_cache import KVCache
from simulator.physics import Physics
from simulator.tokenizer import output_piece, tokenize
from tests.client import wait_for


class Recorder:
    def __init__(self) -> None:
        self.admitted: list[Sequence] = []
        self.finished: list[Sequence] = []

    def on_admit(self, seq: Sequence) -> None:
        self.admitted.append(seq)

    def on_first_token(self, seq: Sequence, ttft_s: float) -> None:
        pass

    def on_finish(self, seq: Sequence, e2e_s: float) -> None:
        self.finished.append(seq)


@pytest.fixture
async def engine_factory() -> AsyncIterator[object]:
    tasks: list[asyncio.Task[None]] = []

    def make(cache_when_scheduled: bool = True, **physics: object) -> tuple[Engine, Recorder]:
        recorder = Recorder()
        engine = Engine(Physics(time_scale=0.05, **physics), recorder,  # type: ignore[arg-type]
                        cache_when_scheduled=cache_when_scheduled)
        tasks.append(asyncio.create_task(engine.run()))
        return engine, recorder

    yield make
    for t in tasks:
        t.cancel()


def request(text: str, max_tokens: int = 4) -> Sequence:
    tokens = tokenize(text)
    return Sequence(request_id=text[:16], tokens=tokens, num_prompt=len(tokens), max_tokens=max_tokens,
                    finish_reason="length", events=asyncio.Queue())


async def complete(engine: Engine, seq: Sequence) -> str:
    engine.submit(seq)
    pieces = []
    assert seq.events is not None
    while (piece := await seq.events.get()) is not None:
        pieces.append(piece)
    return "".join(pieces)


def test_generated_text_tokenizes_back_to_the_same_tokens() -> None:
    text = "".join(output_piece(7, i) for i in range(20))
    assert len(tokenize(text)) == 20
    assert tokenize("Hi, here's zork!") == tokenize("Hi, here's zork!")


async def test_a_repeated_prompt_hits_the_prefix_cache(engine_factory) -> None:  # type: ignore[no-untyped-def]
    engine, _ = engine_factory()
    prompt = "shared system prompt " * 40
    first, second = request(prompt), request(prompt + " and a follow-up question")
    assert await complete(engine, first)
    await complete(engine, second)
    assert first.cached_tokens == 0
    assert second.cached_tokens >= (first.num_prompt // 16) * 16 - 16


@pytest.mark.parametrize("cache_when_scheduled", [True, False], ids=["vllm", "sglang"])
async def test_requests_scheduled_together_share_a_prefix_only_as_vllm_does(  # type: ignore[no-untyped-def]
        engine_factory, cache_when_scheduled: bool) -> None:
    """vLLM V1 commits a chunk's blocks to the prefix cache as it schedules them, so a request admitted in the
    same step as another with its prefix reuses it; SGLang caches after the forward pass, so both compute it."""
    engine, recorder = engine_factory(cache_when_scheduled)
    prompt = "a long shared system prompt " * 60
    leader, follower = request(prompt + "first question"), request(prompt + "second question")
    engine.submit(leader)
    engine.submit(follower)  # both wait for the same first step
    async with asyncio.timeout(30):
        while len(recorder.finished) < 2:
            await asyncio.sleep(0.005)
    assert leader.cached_tokens == 0
    shared_blocks = len(tokenize(prompt)) // 16
    if cache_when_scheduled:
        assert follower.cached_tokens >= (shared_blocks - 1) * 16
    else:
        assert follower.cached_tokens == 0


async def test_batch_size_is_bounded_by_max_num_seqs(engine_factory) -> None:  # type: ignore[no-untyped-def]
    engine, recorder = engine_factory(max_num_seqs=2, max_batched_tokens=64)
    seqs = [request(f"prompt number {i}", max_tokens=30) for i in range(5)]
    for s in seqs:
        engine.submit(s)
    peak = 0
    async with asyncio.timeout(30):
        while len(recorder.finished) < 5:  # every step, until all are done
            peak = max(peak, len(engine.running))
            assert len(engine.running) <= 2 and len(engine.running) + len(engine.waiting) + len(recorder.finished) == 5
            await asyncio.sleep(0.002)
    assert peak == 2
    assert all(s.generated == 30 for s in seqs)


async def test_cold_blocks_are_evicted_least_recent_first_a_sequences_tail_before_its_prefix() -> None:
    evicted: list[object] = []
    cache = KVCache(num_blocks=6, on_evict=evicted.append)
    assert cache.allocate_private(2)
    cache.publish([1, 2])
    cache.release([1, 2])  # cached, unreferenced; freed last block first, as vLLM frees them
    assert cache.allocate_private(2)
    cache.publish([3, 4])
    cache.release([3, 4])  # released later: evicted later
    assert cache.usage == 0 and cache.cached_prefix([1, 2]) == 2
    assert cache.allocate_private(3)  # needs one of the cached blocks back: the oldest's tail
    assert evicted == [2] and cache.cached_prefix([1, 2]) == 1 and cache.cached_prefix([3, 4]) == 2
    assert cache.allocate_private(2)
    assert evicted == [2, 1, 4]
    assert not cache.allocate_private(2)


async def test_a_full_cache_preempts_and_every_request_still_finishes(engine_factory) -> None:  # type: ignore[no-untyped-def]
    engine, recorder = engine_factory(num_blocks=40, max_num_seqs=8, max_batched_tokens=256)
    seqs = [request(f"long running request {i} " * 6, max_tokens=120) for i in range(6)]
    results = await asyncio.wait_for(asyncio.gather(*(complete(engine, s) for s in seqs)), timeout=60)
    assert all(len(tokenize(r)) == 120 for r in results)
    assert engine.cache.used_blocks == 0
    assert len(recorder.admitted) == 6  # a preempted sequence is counted once


async def test_an_aborted_request_frees_its_blocks(engine_factory) -> None:  # type: ignore[no-untyped-def]
    engine, _ = engine_factory()
    seq = request("abandon me " * 50, max_tokens=10_000)
    engine.submit(seq)
    await wait_for(lambda: engine.cache.used_blocks > 0, 2.0)
    engine.abort(seq)
    assert engine.cache.used_blocks == 0 and not engine.running
