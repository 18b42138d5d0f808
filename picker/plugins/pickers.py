"""Pickers: turn scores into the chosen endpoint and its fallbacks."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from picker.plugins.framework import Candidate, SchedulingRequest


@dataclass(frozen=True)
class MaxScorePicker:
    """Highest score first; ties broken at random so equal endpoints share the load."""

    fallbacks: int
    rng: random.Random
    name: str = "max-score"

    def pick(self, request: SchedulingRequest, scored: Sequence[tuple[Candidate, float]]) -> list[Candidate]:
        order = sorted(scored, key=lambda cs: (-round(cs[1], 9), self.rng.random()))
        return [c for c, _ in order[: 1 + self.fallbacks]]
