"""Filters: drop candidates that should not serve a request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from picker.plugins.framework import Candidate, SchedulingRequest
from picker.plugins.scorers import adapter_state


@dataclass(frozen=True)
class DrainFilter:
    """Endpoints an operator drained take no new requests; with all of them drained, none is left."""

    name: str = "drain"

    def filter(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> list[Candidate]:
        return [c for c in candidates if not c.draining]


@dataclass(frozen=True)
class HealthyFilter:
    """Endpoints whose scrapes keep failing leave the candidates until they recover.

    If every endpoint is failing (say the collectors are down), none is dropped:
    routing blind beats refusing all traffic.
    """

    max_scrape_failures: int
    name: str = "healthy"

    def filter(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> list[Candidate]:
        healthy = [c for c in candidates if c.scrape_failures < self.max_scrape_failures]
        return healthy or list(candidates)


@dataclass(frozen=True)
class QueueGuardFilter:
    """Endpoints with a real backlog leave the candidates while any endpoint has none.

    Scores are a weighted sum, so a backlog can only cost an endpoint its queue
    weight, and other signals (a cached prefix, the picker's own in-flight figures,
    blind to load from elsewhere) could still outvote it. A hot prefix therefore
    spills here before its holder's queue grows past the guard.
    """

    max_waiting: float
    name: str = "queue-guard"

    def filter(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> list[Candidate]:
        below = [c for c in candidates if c.load is None or c.load.waiting < self.max_waiting]
        return below or list(candidates)


@dataclass(frozen=True)
class SheddableFilter:
    """Sheddable requests (a negative priority) only go to endpoints that have room (none left: 429)."""

    name: str = "sheddable"

    def filter(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> list[Candidate]:
        if request.priority >= 0:
            return list(candidates)
        return [c for c in candidates if c.room]


@dataclass(frozen=True)
class LoraSlotFilter:
    """An adapter's request avoids endpoints whose LoRA slots are all taken by other adapters, where it
    would wait for a slot; if every endpoint is full, none is dropped."""

    name: str = "lora-slots"

    def filter(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> list[Candidate]:
        kept = [c for c in candidates if adapter_state(request, c) != "full"]
        return kept or list(candidates)
