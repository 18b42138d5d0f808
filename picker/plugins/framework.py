"""One interface per extension point. Plugins do no I/O: everything they need is here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway_state.records import Endpoint, LoadSample


@dataclass(slots=True)  # not frozen: built per endpoint per decision, and a frozen one costs five times as much
class Candidate:  # read-only to every plugin
    endpoint: Endpoint
    load: LoadSample | None  # None: no fresh, good sample, so the load is unknown
    scrape_failures: int  # consecutive failed scrapes of the endpoint
    inflight: int  # requests in flight there, over every picker replica
    matched_blocks: int  # leading prompt blocks the endpoint holds
    # Uncached prompt blocks the endpoint has still to compute: those of the requests in flight there over
    # every replica, less what it computed since they came at its measured speed (Placement._candidates).
    pending_prefill: float = 0.0
    draining: bool = False  # an operator drained it: no new requests, running ones finish
    model_inflight: int = 0  # requests for the request's model (a LoRA adapter, say) in flight there, every replica
    room: bool = True  # below the pool's saturation thresholds (picker.saturation.has_room)
    prefill_blocks_per_s: float = 0.0  # how fast it computes uncached prompt, as measured; 0 unknown


@dataclass(frozen=True)
class SchedulingRequest:
    model: str  # the target model the endpoint will serve
    priority: int  # InferenceObjective priority, or the model's criticality as one (records.CRITICALITY_PRIORITY)
    prompt_blocks: int  # how many prefix blocks the prompt has
    first_block: str = ""  # hash of the prompt's first block; empty without prefix routing
    work_blocks: int = 0  # the whole prompt in blocks, uncapped: its prefill work where nothing is cached


class Filter(Protocol):
    @property
    def name(self) -> str: ...

    def filter(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> list[Candidate]:
        """The candidates that may serve the request."""
        ...


class Scorer(Protocol):
    @property
    def name(self) -> str: ...

    def score(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> list[float]:
        """One score per candidate, in order; higher is better, 0..1 (the runner clamps)."""
        ...


class Picker(Protocol):
    @property
    def name(self) -> str: ...

    def pick(self, request: SchedulingRequest, scored: Sequence[tuple[Candidate, float]]) -> list[Candidate]:
        """The chosen candidate first, then fallbacks in order."""
        ...
