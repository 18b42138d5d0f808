"""Prefix-cache hit counts per pool and model, added up in memory and flushed to Redis each heartbeat.

The admin API reads them back as hit ratios over 1 min, 5 min and 1 h for the
whole fleet. Nothing is written on the request path. Model names come from
clients when a pool serves any model, so each pool keeps at most a bounded
number of names per flush; the rest count as `(other)`.
"""

from __future__ import annotations

OTHER = "(other)"


class HitCounts:
    def __init__(self, max_models_per_pool: int = 64) -> None:
        self._max = max_models_per_pool
        self._counts: dict[tuple[str, str], list[int]] = {}
        self._models: dict[str, set[str]] = {}

    def add(self, pool: str, model: str, queried: int, matched: int) -> None:
        names = self._models.setdefault(pool, set())
        if model not in names:
            if len(names) >= self._max:
                model = OTHER
            names.add(model)
        counts = self._counts.setdefault((pool, model), [0, 0])
        counts[0] += queried
        counts[1] += matched

    def take(self) -> dict[tuple[str, str], tuple[int, int]]:
        """What was added since the last take: (pool, model) -> (queried, matched)."""
        out = {k: (v[0], v[1]) for k, v in self._counts.items()}
        self._counts.clear()
        self._models.clear()
        return out

    def give_back(self, counts: dict[tuple[str, str], tuple[int, int]]) -> None:
        """A flush that failed: keep the counts for the next one."""
        for (pool, model), (queried, matched) in counts.items():
            self.add(pool, model, queried, matched)
