"""The scheduling runner: filters, then weighted scorers, then the picker.

The runner, not the plugins, owns clamping, weights, timing and logging, so a
plugin stays a small pure function and every strategy is measured the same way.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from gateway_state.records import Strategy
from picker.errors import NoEndpoint, Shed
from picker.plugins.filters import DrainFilter, HealthyFilter, LoraSlotFilter, QueueGuardFilter, SheddableFilter
from picker.plugins.framework import Candidate, Filter, Picker, SchedulingRequest, Scorer
from picker.plugins.pickers import MaxScorePicker
from picker.plugins.scorers import (
    AdapterHomeScorer,
    InflightScorer,
    KVCacheScorer,
    LoraAffinityScorer,
    PrefillWorkScorer,
    PrefixHomeScorer,
    PrefixScorer,
    QueueScorer,
    prefill_work_scale,
)
from picker.settings import SchedulingSettings

log = logging.getLogger("picker.scheduler")


class Profile(StrEnum):
    """The scheduling profiles; the first two are the pools' strategies by name."""

    DEFAULT = Strategy.DEFAULT.value  # queue, KV cache, in-flight, prefill work
    PREFIX_CACHE = Strategy.PREFIX_CACHE.value  # the same, with prefix affinity
    DECODE = "decode"  # an SGLang PD pool's decode side: its prompt arrives as KV cache, so load decides


@dataclass(frozen=True)
class Weighted:
    scorer: Scorer
    weight: float


@dataclass(frozen=True)
class ProfileSpec:
    filters: tuple[Filter, ...]
    scorers: tuple[Weighted, ...]
    picker: Picker


@dataclass(frozen=True)
class Decision:
    endpoints: list[Candidate]  # the chosen one first, then fallbacks
    seconds: float
    scores: list[float] = field(default_factory=list)  # the endpoints' totals, in their order
    beyond: float = -math.inf  # the best total of a candidate not among the endpoints


@dataclass
class Trace:
    """What one decision went through, for explaining it: filled by the runner when asked."""

    candidates: list[str] = field(default_factory=list)  # endpoint keys, in pool order
    removed: list[tuple[str, list[str]]] = field(default_factory=list)  # (filter, endpoints it removed)
    scores: list[tuple[str, float, dict[str, float]]] = field(default_factory=list)  # (scorer, weight, raw)
    totals: dict[str, float] = field(default_factory=dict)  # endpoint -> weighted sum
    picker: str = ""


class Scheduler:
    def __init__(self, profiles: Mapping[str, ProfileSpec]) -> None:
        self._profiles = dict(profiles)

    def schedule(self, profile_name: str, request: SchedulingRequest, candidates: Sequence[Candidate],
                 trace: Trace | None = None, at_least: int = 0) -> Decision:
        """`profile_name`: a Profile (a pool's Strategy names one). `at_least`: the decision's endpoints go on
        past the picker's fallbacks, best first, to this many (or every candidate, if fewer)."""
        started = time.perf_counter()
        profile = self._profiles[profile_name]
        remaining = list(candidates)
        if trace is not None:
            trace.candidates = [c.endpoint.key for c in remaining]
            trace.picker = profile.picker.name
        for f in profile.filters:
            kept = f.filter(request, remaining)
            if trace is not None:
                trace.removed.append((f.name, [c.endpoint.key for c in remaining if c not in kept]))
            remaining = kept
            if not remaining:
                if f.name == "sheddable":
                    raise Shed("Every endpoint is saturated; sheddable requests are refused until load drops.")
                raise NoEndpoint(f"No endpoint passed the {f.name} filter.")
        totals = [0.0] * len(remaining)
        for w in profile.scorers:
            if w.weight == 0 and trace is None:
                continue  # weighed at nothing: only an explanation shows its scores
            scores = w.scorer.score(request, remaining)
            if len(scores) != len(remaining):
                raise ValueError(f"scorer {w.scorer.name} gave {len(scores)} scores for {len(remaining)} candidates")
            if trace is not None:
                trace.scores.append((w.scorer.name, w.weight,
                                     {c.endpoint.key: s for c, s in zip(remaining, scores, strict=True)}))
            weight = w.weight
            for i, s in enumerate(scores):  # clamped to 0..1
                totals[i] += weight * (0.0 if s < 0.0 else 1.0 if s > 1.0 else s)
        if trace is not None:
            trace.totals = {c.endpoint.key: t for c, t in zip(remaining, totals, strict=True)}
        scored = list(zip(remaining, totals, strict=True))
        chosen = profile.picker.pick(request, scored)
        if len(chosen) < at_least:
            picked = {id(c) for c in chosen}
            chosen += [c for c, _ in heapq.nsmallest(at_least - len(chosen), (cs for cs in scored
                                                                               if id(cs[0]) not in picked),
                                                     key=lambda cs: -cs[1])]
        if log.isEnabledFor(logging.DEBUG):
            log.debug("scores %s", {c.endpoint.name: round(t, 3) for c, t in scored})
        total_of = {id(c): t for c, t in scored}
        scores = [total_of.pop(id(c)) for c in chosen]
        return Decision(chosen, time.perf_counter() - started, scores, max(total_of.values(), default=-math.inf))


def load_slopes(s: SchedulingSettings, candidates: Sequence[Candidate]) -> tuple[float, float]:
    """What one more request in flight at an endpoint, and one more uncached prompt block there, take off its
    total in both profiles (the in-flight and prefill-work scorers' weight over their scale, the cold scale
    for a prompt no candidate holds any of), for re-weighing a decision on later figures."""
    scale = prefill_work_scale(s.prefill_work_scale, s.prefill_work_cold_scale, candidates)
    return s.inflight_weight / s.inflight_scale, s.prefill_work_weight / scale


def build_profiles(s: SchedulingSettings, rng: random.Random) -> dict[str, ProfileSpec]:
    filters = (DrainFilter(), HealthyFilter(s.max_scrape_failures), LoraSlotFilter(),
               QueueGuardFilter(s.queue_guard_waiting), SheddableFilter())
    load = (Weighted(QueueScorer(s.queue_scale), s.queue_weight), Weighted(KVCacheScorer(), s.kv_cache_weight),
            Weighted(InflightScorer(s.inflight_scale), s.inflight_weight),
            Weighted(LoraAffinityScorer(), s.lora_affinity_weight),
            Weighted(AdapterHomeScorer(), s.adapter_home_weight),
            Weighted(PrefillWorkScorer(s.prefill_work_scale, s.prefill_work_cold_scale), s.prefill_work_weight))
    picker = MaxScorePicker(s.fallbacks, rng, s.tie_margin)
    return {
        Profile.DEFAULT: ProfileSpec(filters, load, picker),
        Profile.PREFIX_CACHE: ProfileSpec(filters, (*load, Weighted(PrefixScorer(), s.prefix_weight),
                                                    Weighted(PrefixHomeScorer(), s.prefix_home_weight)), picker),
        Profile.DECODE: ProfileSpec(filters, load[:5], picker),
    }
