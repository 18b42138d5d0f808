"""This replica's own view: its in-flight counts and, in the in-memory mode, a prefix index.

With Redis (the product) it holds this replica's own in-flight figures, which
its decisions read here, exact and at once; the other replicas' come from
Redis. In `--state local` it is the whole state, as upstream pickers keep it:
each replica sees only its own requests and forgets everything on restart.
That mode exists to measure what the shared state is worth.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Sequence

from gateway_state.store import SharedView


class LocalState:
    def __init__(self) -> None:
        self._inflight: dict[str, Counter[str]] = {}  # pool -> endpoint -> requests
        self._work: dict[str, Counter[str]] = {}  # pool -> endpoint -> uncached prompt blocks in flight
        self._holders: dict[str, dict[str, set[str]]] = {}  # pool -> block hash -> endpoints holding it
        self._lru: dict[tuple[str, str], OrderedDict[str, None]] = {}  # (pool, endpoint) -> blocks, oldest first

    def view(self, pool: str, block_hashes: Sequence[str]) -> SharedView:
        matched: dict[str, int] = {}
        holders = self._holders.get(pool, {})
        for depth, h in enumerate(block_hashes, start=1):
            endpoints = holders.get(h)
            if not endpoints:
                break
            for e in endpoints:
                matched[e] = depth
        return SharedView(dict(self._inflight.get(pool, {})), matched, dict(self._work.get(pool, {})))

    def admit(self, pool: str, endpoint: str, work_blocks: int = 0) -> None:
        """A request (and its uncached prompt blocks) in flight at `endpoint`."""
        self._inflight.setdefault(pool, Counter())[endpoint] += 1
        if work_blocks > 0:
            self._work.setdefault(pool, Counter())[endpoint] += work_blocks

    def index(self, pool: str, endpoint: str, block_hashes: Sequence[str], capacity_blocks: int) -> None:
        """`endpoint` now holds the blocks, in an LRU bounded by its capacity."""
        holders = self._holders.setdefault(pool, {})
        lru = self._lru.setdefault((pool, endpoint), OrderedDict())
        # Deepest first, so the shallow blocks are the most recent and leaves are evicted first.
        for h in reversed(block_hashes):
            holders.setdefault(h, set()).add(endpoint)
            lru[h] = None
            lru.move_to_end(h)
        while len(lru) > capacity_blocks:
            h, _ = lru.popitem(last=False)
            endpoints = holders.get(h)
            if endpoints is not None:
                endpoints.discard(endpoint)
                if not endpoints:
                    del holders[h]

    def release(self, pool: str, endpoint: str, work_blocks: int = 0) -> None:
        for table, amount in ((self._inflight, 1), (self._work, work_blocks)):
            counts = table.get(pool)
            if counts is not None and amount > 0 and endpoint in counts:
                counts[endpoint] -= amount
                if counts[endpoint] <= 0:
                    del counts[endpoint]
