"""Pickers: turn scores into the chosen endpoint and its fallbacks."""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence
from dataclasses import dataclass

from picker.plugins.framework import Candidate, SchedulingRequest


@dataclass(frozen=True)
class MaxScorePicker:
    """Highest score first; candidates within `tie_margin` of the best count as tied.

    Ties go at random, so near-equal endpoints share a burst instead of all of it
    landing on the one a hair ahead (a trivially short shared prefix, say); where
    replicas deciding at the same instant take the same one, the admission re-weighs
    the decision's options on the pool's figures of that instant (scripts.ADMIT).
    """

    fallbacks: int
    rng: random.Random
    tie_margin: float
    name: str = "max-score"

    def pick(self, request: SchedulingRequest, scored: Sequence[tuple[Candidate, float]]) -> list[Candidate]:
        best = max(score for _, score in scored)
        tied = [c for c, score in scored if score >= best - self.tie_margin]
        chosen = tied[self.rng.randrange(len(tied))]
        # The best `fallbacks` of the rest in the order sorting them all would give (each draws its tie-break
        # once, in turn, as sorting does), without sorting a large pool's every candidate.
        rest = heapq.nsmallest(self.fallbacks, ((c, s) for c, s in scored if c is not chosen),
                               key=lambda cs: (-cs[1], self.rng.random()))
        return [chosen, *(c for c, _ in rest)]
