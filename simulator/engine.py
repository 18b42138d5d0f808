"""Continuous batching with chunked prefill, as vLLM's V1 scheduler does it.

Every step the scheduler gives each running sequence the tokens it still needs
to compute (a whole prefill chunk, or the one decode token), within the per-step
token budget, then admits waiting sequences while the batch has room and the KV
cache has blocks. A sequence that cannot get a block for its next token preempts
the newest running one, which later recomputes (mostly from the prefix cache).

When a chunk's blocks join the prefix cache is where vLLM and SGLang differ.
vLLM V1 caches them as it allocates them for the step (`KVCacheManager.
allocate_slots` commits the blocks of the tokens scheduled), so a request
scheduled after another in the same step, or while its prefill runs, reuses the
prefix it is computing: each layer writes the step's keys and values before
attending. SGLang inserts a prompt into its radix cache after the forward pass,
and its default first-come-first-served policy does not hold back a request
whose prefix another in the batch is computing: both compute it.
"""

from __future__ import annotations

import asyncio
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from simulator.block_hashes import BlockHasher, VllmHashes, extend_chain, extra_keys
from simulator.kv_cache import KVCache
from simulator.kv_events import KvEventPublisher
from simulator.lora import Adapters
from simulator.physics import Physics
from simulator.tokenizer import output_piece, tokenize


class EngineObserver(Protocol):
    def on_admit(self, seq: Sequence) -> None: ...
    def on_first_token(self, seq: Sequence, ttft_s: float) -> None: ...
    def on_finish(self, seq: Sequence, e2e_s: float) -> None: ...


@dataclass(eq=False)
class Sequence:
    request_id: str
    tokens: list[int]  # prompt, then each generated token
    num_prompt: int
    max_tokens: int
    finish_reason: str  # "length" when max_tokens was asked for, else "stop"
    adapter: str | None = None
    salt: str | None = None  # the request's cache_salt: its blocks are its own
    transferred: int = 0  # prompt tokens whose KV cache arrived from a prefill pod (SGLang PD decode)
    events: asyncio.Queue[str | None] | None = None  # generated pieces, then None; None for synthetic load
    arrival_s: float = 0.0
    computed: int = 0  # tokens whose KV is in the cache
    cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    admitted_once: bool = False
    shared: list[bytes] = field(default_factory=list)  # cached block hashes referenced
    private: int = 0  # blocks held that are not shared (partial, or not yet published)
    chain: list[bytes] = field(default_factory=list)  # chained hashes of this sequence's full blocks
    first_token_s: float | None = None
    state: str = "new"  # new -> waiting -> running (-> waiting when preempted) -> done

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def held_blocks(self) -> int:
        return len(self.shared) + self.private


def _blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class Engine:
    def __init__(self, physics: Physics, observer: EngineObserver, adapters: Adapters | None = None,
                 cache_when_scheduled: bool = True, hasher: BlockHasher | None = None,
                 events: KvEventPublisher | None = None) -> None:
        self.physics = physics
        self.cache_when_scheduled = cache_when_scheduled  # vLLM: True; SGLang: False (see above)
        self.hasher: BlockHasher = hasher or VllmHashes()
        self.events = events  # None: the engine publishes no KV-cache events
        self.cache = KVCache(physics.num_blocks, self._evicted if events is not None else None)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.adapters = adapters  # None: LoRA disabled
        self._observer = observer
        self._wake = asyncio.Event()
        self._load_s = 0.0  # adapter loading the next step pays

    def submit(self, seq: Sequence) -> None:
        seq.arrival_s = asyncio.get_running_loop().time()
        seq.state = "waiting"
        self.waiting.append(seq)
        self._wake.set()

    def abort(self, seq: Sequence) -> None:
        """The client went away: free the sequence's slot and blocks."""
        if seq.state == "waiting":
            self.waiting.remove(seq)
            seq.state = "done"
        elif seq.state == "running":
            self._finish(seq)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.running and not self.waiting:
                self._wake.clear()
                await self._wake.wait()
            batch = self._schedule()
            decode = [seq for seq, chunk in batch if chunk == 1 and seq.first_token_s is not None]
            prefill = sum(chunk for _, chunk in batch) - len(decode)
            context = sum(len(seq.tokens) for seq in decode)
            step = self.physics.step_seconds(prefill, len(decode), context) + self._load_s
            self._load_s = 0.0
            await asyncio.sleep(step * self.physics.time_scale)
            self._advance(batch, loop.time())
            if self.events is not None:
                self.events.flush()

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block (vLLM's /reset_prefix_cache, SGLang's /flush_cache); refused while
        sequences hold blocks, as the engines refuse it."""
        if not self.cache.reset():
            return False
        if self.events is not None:
            self.events.cleared()
            self.events.flush()
        return True

    # -- scheduling -------------------------------------------------------------

    def _schedule(self) -> list[tuple[Sequence, int]]:
        bs = self.physics.block_size
        budget = self.physics.max_batched_tokens
        batch: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if seq.state != "running" or budget <= 0:
                continue  # preempted by an older sequence this step
            chunk = min(len(seq.tokens) - seq.computed, budget)
            if not self._grow(seq, _blocks(seq.computed + chunk, bs) - seq.held_blocks):
                continue
            batch.append((seq, chunk))
            budget -= chunk
            self._scheduled(seq, chunk)
        running_adapters = {s.adapter for s in self.running if s.adapter}
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.physics.max_num_seqs:
                break
            if self.adapters is not None and not self.adapters.admits(seq.adapter, running_adapters):
                continue  # every LoRA slot is busy with other adapters: it waits, later ones may go
            admitted = self._admit(seq, budget)
            if admitted == 0:
                break
            self.waiting.remove(seq)
            self.running.append(seq)
            seq.state = "running"
            if self.adapters is not None and seq.adapter:
                self._load_s += self.adapters.use(seq.adapter)
                running_adapters.add(seq.adapter)
            batch.append((seq, admitted))
            budget -= admitted
            self._scheduled(seq, admitted)
        return batch

    def _scheduled(self, seq: Sequence, chunk: int) -> None:
        if self.cache_when_scheduled:
            self._publish(seq, seq.computed + chunk)

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Reserve blocks for the sequence's first chunk; 0 when the cache is full."""
        bs = self.physics.block_size
        if seq.transferred and not seq.admitted_once:
            # The prompt's KV cache came from the prefill pod: blocks for all of it, compute for the rest.
            chunk = min(len(seq.tokens) - seq.transferred, budget)
            need = _blocks(seq.transferred + chunk, bs)
            if not self.cache.allocate_private(need):
                return 0
            seq.private, seq.computed, seq.admitted_once = need, seq.transferred, True
            self._observer.on_admit(seq)
            return chunk
        self._extend_chain(seq)
        hit = self.cache.cached_prefix(seq.chain)
        hit = min(hit, (len(seq.tokens) - 1) // bs)  # the last token is always computed
        reuse = seq.chain[:hit]
        chunk = min(len(seq.tokens) - hit * bs, budget)
        need = _blocks(hit * bs + chunk, bs) - hit
        if not self.cache.can_allocate(need, reuse):
            return 0
        self.cache.acquire(reuse)
        self.cache.allocate_private(need)
        seq.shared, seq.private, seq.computed = list(reuse), need, hit * bs
        if not seq.admitted_once:
            seq.admitted_once = True
            seq.cached_tokens = min(hit * bs, seq.num_prompt)
            self._observer.on_admit(seq)
        return chunk

    def _grow(self, seq: Sequence, need: int) -> bool:
        """Give `seq` `need` more blocks, preempting the newest sequences if the cache is full."""
        while need > 0 and not self.cache.allocate_private(need):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        if need > 0:
            seq.private += need
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.computed = 0
        seq.state = "waiting"
        self.waiting.appendleft(seq)

    # -- after the step ---------------------------------------------------------

    def _advance(self, batch: list[tuple[Sequence, int]], now: float) -> None:
        for seq, chunk in batch:
            if seq.state != "running":
                continue  # preempted or aborted during the step
            seq.computed += chunk
            self._publish(seq)
            if seq.computed < len(seq.tokens):
                continue  # prefill continues next step
            piece = output_piece(seq.num_prompt, seq.generated)
            seq.tokens.extend(tokenize(piece))
            if seq.first_token_s is None:
                seq.first_token_s = now
                self._observer.on_first_token(seq, now - seq.arrival_s)
            if seq.events is not None:
                seq.events.put_nowait(piece)
            if seq.generated >= seq.max_tokens:
                self._finish(seq)
                self._observer.on_finish(seq, now - seq.arrival_s)
                if seq.events is not None:
                    seq.events.put_nowait(None)

    def _publish(self, seq: Sequence, upto: int | None = None) -> None:
        """Share the sequence's full blocks up to token `upto` (default: those computed) through the prefix cache."""
        self._extend_chain(seq)
        full = min((seq.computed if upto is None else upto) // self.physics.block_size, len(seq.chain))
        start = len(seq.shared)
        fresh = seq.chain[start:full]
        if not fresh:
            return
        new = [not self.cache.holds(h) for h in fresh] if self.events is not None else []
        seq.private -= self.cache.publish(fresh)
        seq.shared.extend(fresh)
        i = 0
        while i < len(new):  # announce each run of blocks the cache did not hold, as the engine does
            if not new[i]:
                i += 1
                continue
            j = i
            while j < len(new) and new[j]:
                j += 1
            self._announce(seq, start + i, start + j)
            i = j

    def _announce(self, seq: Sequence, first: int, end: int) -> None:
        """BlockStored for the sequence's blocks [first, end): one event (vLLM) or one per page (SGLang)."""
        assert self.events is not None
        bs, wire = self.physics.block_size, self.hasher.wire
        lora_id = zlib.crc32(seq.adapter.encode()) & 0x7FFFFFFF if seq.adapter else None
        groups = [(i, i + 1) for i in range(first, end)] if self.events.runtime == "sglang" else [(first, end)]
        for a, b in groups:
            self.events.stored([wire(h) for h in seq.chain[a:b]], wire(seq.chain[a - 1]) if a else None,
                               seq.tokens[a * bs: b * bs], bs, lora_id, seq.adapter,
                               [extra_keys(i, seq.adapter, seq.salt) for i in range(a, b)])

    def _evicted(self, h: object) -> None:
        assert self.events is not None and isinstance(h, bytes)
        self.events.removed([self.hasher.wire(h)])

    def _extend_chain(self, seq: Sequence) -> None:
        extend_chain(seq.chain, seq.tokens, self.physics.block_size, self.hasher, seq.adapter, seq.salt)

    def _finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.state = "done"
        self._free(seq)

    def _free(self, seq: Sequence) -> None:
        self.cache.release(seq.shared)
        self.cache.free_private(seq.private)
        seq.shared, seq.private = [], 0
