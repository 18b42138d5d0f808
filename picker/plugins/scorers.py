"""Scorers: each rates every candidate 0..1 from one signal."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mmh3

from picker.plugins.framework import Candidate, SchedulingRequest
from picker.saturation import queue_for_new


def _relative(values: Sequence[float | None], scale: float) -> list[float]:
    """1 for the least loaded, falling by the excess over it measured against `scale`.

    Against a fixed scale, not the spread: one request more must not look like
    a backlog when the pool is idle. Unknown values score in the middle.
    """
    known = [v for v in values if v is not None]
    if not known:
        return [0.5] * len(values)
    low = min(known)
    # Floored at 0 inline, not by max(): this runs for every candidate of every scorer of every decision.
    return [0.5 if v is None else (r if (r := 1.0 - (v - low) / scale) > 0.0 else 0.0) for v in values]


def _nobody_holds(candidates: Sequence[Candidate]) -> bool:
    """No candidate holds any of the prompt: a cold prompt, computed whole wherever it goes."""
    return not any(c.matched_blocks for c in candidates)


def prefill_work_scale(scale: float, cold_scale: float, candidates: Sequence[Candidate]) -> float:
    """The prefill work against which PrefillWorkScorer measures a difference: `cold_scale` for a prompt
    no candidate holds any of, else `scale`."""
    return cold_scale if _nobody_holds(candidates) else scale


@dataclass(frozen=True)
class QueueScorer:
    """Fewer requests ahead in the model server's queue is better: those waiting there, and one more
    where every batch slot is taken (picker.saturation.queue_for_new)."""

    scale: float
    name: str = "queue"

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> list[float]:
        return _relative([queue_for_new(c.load) if c.load else None for c in candidates], self.scale)


@dataclass(frozen=True)
class KVCacheScorer:
    """More free KV cache is better."""

    name: str = "kv-cache"

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> list[float]:
        return [1.0 - c.load.kv_cache_usage if c.load else 0.5 for c in candidates]


@dataclass(frozen=True)
class InflightScorer:
    """Fewer requests in flight, counted by every picker replica at once, is better.

    Scrapes lag by up to an interval; these counts do not, so replicas do not
    herd onto the same idle endpoint between scrapes.
    """

    scale: float
    name: str = "inflight"

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> list[float]:
        return _relative([float(c.inflight) for c in candidates], self.scale)


@dataclass(frozen=True)
class PrefillWorkScorer:
    """Less prefill before this request's first token is better: the uncached prompt the
    endpoint has still to compute plus this prompt's own uncached part there.

    A request count says nothing of size: a cold 4,000-token prompt holds the batch
    for hundreds of milliseconds while a cached follow-up costs a few. So a new long
    prompt goes where no other long prefill is under way, while a follow-up whose
    prefix is cached stays with it: computing the prefix elsewhere costs more than
    sharing a step with someone else's prefill.
    """

    scale: float
    # For a prompt no candidate holds any of, where every placement computes it all: only the prefill
    # ahead of it differs, so it decides, over the prefix home and small differences of load.
    cold_scale: float
    name: str = "prefill-work"

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> list[float]:
        scale = prefill_work_scale(self.scale, self.cold_scale, candidates)
        work = request.work_blocks
        return _relative([c.pending_prefill + (work - c.matched_blocks if work > c.matched_blocks else 0)
                          for c in candidates], scale)


@dataclass(frozen=True)
class PrefixHomeScorer:
    """A prefix nobody holds yet goes to its home: the rendezvous winner for its first block.

    Replicas deciding at the same instant cannot see each other's choices, so
    without a home the first requests of a new prefix (a group's shared system
    prompt) scatter over several endpoints, each computing and caching it.
    Every replica computes the same home, without coordinating.
    """

    name: str = "prefix-home"

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> list[float]:
        if not request.first_block or not _nobody_holds(candidates):
            return [0.0] * len(candidates)
        home = max(candidates, key=lambda c: mmh3.hash64(f"{request.first_block}|{c.endpoint.key}",
                                                         signed=False)[0])
        return [1.0 if c is home else 0.0 for c in candidates]


@dataclass(frozen=True)
class PrefixScorer:
    """The longer the prompt prefix already in an endpoint's KV cache, the better."""

    name: str = "prefix"

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> list[float]:
        if request.prompt_blocks == 0:
            return [0.0] * len(candidates)
        return [c.matched_blocks / request.prompt_blocks for c in candidates]


def adapter_state(request: SchedulingRequest, c: Candidate) -> str:
    """Where the request's model stands on the endpoint, as a LoRA adapter: `running`, `waiting` (or in
    flight there), `free` (a slot is open), `full`, or `none` (not an adapter there, or no sample)."""
    load, model = c.load, request.model
    if load is None or load.max_adapters <= 0:
        return "none"
    if model in load.running_adapters:
        return "running"
    if model in load.waiting_adapters:
        return "waiting"
    if model == load.base_model or not load.base_model:
        return "none"  # the base model, or a server that did not say which model it runs
    if c.model_inflight > 0:
        return "waiting"  # routed there since the last sample
    resident = len(set(load.running_adapters) | set(load.waiting_adapters))
    return "free" if resident < load.max_adapters else "full"


_LORA_SCORES = {"running": 1.0, "waiting": 0.8, "free": 0.6, "full": 0.0, "none": 0.6}


@dataclass(frozen=True)
class LoraAffinityScorer:
    """An adapter's requests go where it runs, then where it waits, then where a slot is open (upstream's
    LoRA affinity). The base model's requests score alike everywhere."""

    name: str = "lora-affinity"

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> list[float]:
        return [_LORA_SCORES[adapter_state(request, c)] for c in candidates]


@dataclass(frozen=True)
class AdapterHomeScorer:
    """A LoRA adapter's requests lean towards its home: the rendezvous winner for its name.

    vLLM reports the adapters running and waiting, not those still resident in a
    slot while idle, so affinity alone forgets an adapter between its requests and
    every pod ends up loading every popular one. A home per adapter, the same on
    every replica, partitions the adapters over the pods; load still overrules it.
    """

    name: str = "adapter-home"

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> list[float]:
        if all(adapter_state(request, c) == "none" for c in candidates):
            return [0.0] * len(candidates)
        home = max(candidates, key=lambda c: mmh3.hash64(f"{request.model}|{c.endpoint.key}", signed=False)[0])
        return [1.0 if c is home else 0.0 for c in candidates]
