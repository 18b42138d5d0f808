"""The writes after a decision, off its path: the prompt's blocks to index and the requests to release.

One task per pool sends the writes gathered meanwhile in one round trip each, so under load many
decisions share a call, and at rest each write goes at once.
"""

from __future__ import annotations

from gateway_state.placement_store import IndexWrite, SpeculativeWrite, Write
from picker.state import MemoryState, PlacementState
from picker.state_guard import StateGuard

# The most one round trip of writes carries, in blocks indexed plus requests released: about 2.5 ms of
# Lua at the measured 10 us per indexed block, so a burst of writes never stalls Redis for long.
MAX_WRITE_BATCH = 256
# Off the request path a slower state may take longer; the heartbeat heals a lost release.
WRITE_SLACK = 10.0


class WriteBatcher:
    def __init__(self, state: PlacementState, fallback_index: MemoryState | None, guard: StateGuard) -> None:
        self._state = state
        self._fallback = fallback_index  # None when the state is this replica's memory already
        self._guard = guard
        self._pending: dict[str, list[Write]] = {}  # pool -> writes not yet sent
        self._writing: set[str] = set()  # pools whose writer task runs

    def add(self, pool: str, write: Write) -> None:
        self._pending.setdefault(pool, []).append(write)
        if pool not in self._writing:
            self._writing.add(pool)
            self._guard.later(self._write_pending(pool))

    async def _write_pending(self, pool: str) -> None:
        try:
            while pending := self._pending.pop(pool, None):
                for batch in write_batches(pending):
                    indexed = [w for w in batch if isinstance(w, IndexWrite | SpeculativeWrite)]
                    if self._fallback is not None and indexed:
                        await self._fallback.write(pool, indexed)
                    await self._guard.call("write", self._state.write(pool, batch), WRITE_SLACK)
        finally:
            self._writing.discard(pool)


def write_batches(writes: list[Write]) -> list[list[Write]]:
    """The writes in order, cut into calls of at most MAX_WRITE_BATCH blocks-or-releases (one write at least)."""
    out: list[list[Write]] = [[]]
    size = 0
    for w in writes:
        cost = len(w.block_hashes) if isinstance(w, IndexWrite | SpeculativeWrite) else 1
        if out[-1] and size + cost > MAX_WRITE_BATCH:
            out.append([])
            size = 0
        out[-1].append(w)
        size += cost
    return out
