"""The writes after a decision, off its path: the prompt's blocks to index and the requests to release.

A decision's own index write rides on its admission (`Placement.commit`), unless another admission of the
pool is under way: in a burst the admissions go first, and the index writes wait until none is under way
(at most INDEX_HOLD_S), then go together. What else gathers (releases, mostly) waits up to LINGER_S for the
next lookup (releases) or admission (anything, outside a burst) in its pool to carry it, in the same round
trip; when none comes, one task per pool sends what gathered in one call, so at rest a release goes within
LINGER_S and under load many share a call or ride along.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable

from gateway_state.placement_store import IndexWrite, ReleaseWrite, SpeculativeWrite, Write
from picker.state import MemoryState, PlacementState
from picker.state_guard import StateGuard

# The most one round trip of writes carries, in blocks indexed plus requests released: about 2.5 ms of
# Lua at the measured 10 us per indexed block, so a burst of writes never stalls Redis for long.
MAX_WRITE_BATCH = 256
# Off the request path a slower state may take longer; the heartbeat heals a lost release.
WRITE_SLACK = 10.0
# How long gathered writes wait for a lookup (releases) or an admission to carry them: a round trip saved
# per decision under load, and another replica sees a request end this much later at most.
LINGER_S = 0.002
# The most releases a lookup carries (scripts.LOOKUP): a few µs of Lua each, on the request path.
LOOKUP_RELEASES = 16
# How long index writes wait for the pool's admissions under way (a burst) before going anyway. A fresh
# prompt's index write is about 10 µs of Lua a block (a 2,000-token prompt, 1 to 1.5 ms on a loaded
# machine); riding on admissions or sent between them, a burst's writes held up every admission behind them.
# Meanwhile the prompts are not yet in the shared index, so a burst of one new prefix spreads by load.
INDEX_HOLD_S = 0.1


class WriteBatcher:
    def __init__(self, state: PlacementState, fallback_index: MemoryState | None, guard: StateGuard) -> None:
        self._state = state
        self._fallback = fallback_index  # None when the state is this replica's memory already
        self._guard = guard
        self._pending: dict[str, list[Write]] = {}  # pool -> writes not yet sent
        self._writing: set[str] = set()  # pools whose writer task runs or is due
        self._admitting: Counter[str] = Counter()  # pool -> this replica's admissions sent and not answered yet

    def under_way(self, pool: str, admission: Awaitable[int]) -> asyncio.Future[int]:
        """The admission sent (on one Redis it already is; a cluster's coroutine becomes a task), counted as
        under way until its answer: until then, where it counts the request in the state is unknown."""
        sent = asyncio.ensure_future(admission)
        self._admitting[pool] += 1
        sent.add_done_callback(lambda _: self._admitting.subtract((pool,)))
        return sent

    def admitting(self, pool: str) -> int:
        """How many of the pool's admissions are under way."""
        return self._admitting[pool]

    def add(self, pool: str, write: Write) -> None:
        self._pending.setdefault(pool, []).append(write)
        if pool not in self._writing:
            self._writing.add(pool)
            asyncio.get_running_loop().call_later(LINGER_S, self._start, pool)

    def take(self, pool: str) -> list[Write]:
        """The writes gathered for `pool`, for an admission to carry (at most one batch's worth)."""
        pending = self._pending.get(pool)
        if not pending:
            return []
        batches = write_batches(pending)
        if len(batches) == 1:
            del self._pending[pool]
        else:
            self._pending[pool] = [w for b in batches[1:] for w in b]
        return batches[0]

    def take_releases(self, pool: str) -> list[ReleaseWrite]:
        """Up to LOOKUP_RELEASES of the releases gathered for `pool`, for a lookup to carry; the rest stays."""
        pending = self._pending.get(pool)
        if not pending:
            return []
        taken: list[ReleaseWrite] = []
        kept: list[Write] = []
        for w in pending:
            if isinstance(w, ReleaseWrite) and len(taken) < LOOKUP_RELEASES:
                taken.append(w)
            else:
                kept.append(w)
        if kept:
            self._pending[pool] = kept
        else:
            del self._pending[pool]
        return taken

    def drop_releases(self, pool: str) -> None:
        """Forget the releases gathered for `pool`: the replica's record is replaced whole without those
        requests (the heartbeat), and applied after it they would take them off a second time."""
        kept: list[Write] = [w for w in self._pending.get(pool, ()) if not isinstance(w, ReleaseWrite)]
        if kept:
            self._pending[pool] = kept
        else:
            self._pending.pop(pool, None)

    def gathered(self) -> bool:
        """Whether any writes wait to be sent."""
        return any(self._pending.values())

    def flush(self) -> None:
        """Send what gathered now (shutdown)."""
        for pool in list(self._pending):
            self._guard.later(self._write_pending(pool))

    def _start(self, pool: str, held_s: float = 0.0) -> None:
        pending = self._pending.get(pool)
        if pending and self._admitting[pool] > 0 and held_s < INDEX_HOLD_S \
                and any(isinstance(w, IndexWrite | SpeculativeWrite) for w in pending):
            asyncio.get_running_loop().call_later(LINGER_S, self._start, pool, held_s + LINGER_S)
        elif pending:
            self._guard.later(self._write_pending(pool))
        else:
            self._writing.discard(pool)

    async def _write_pending(self, pool: str) -> None:
        """Tried even while the guard backs off (a request-path call missed its deadline a moment ago): a
        write skipped is lost, and only one call per pool is under way. After a failed call the rest of
        what gathered is noted in the fallback index alone."""
        try:
            while pending := self._pending.pop(pool, None):
                failed = False
                for batch in write_batches(pending):
                    indexed = [w for w in batch if isinstance(w, IndexWrite | SpeculativeWrite)]
                    if self._fallback is not None and indexed:
                        await self._fallback.write(pool, indexed)
                    if not failed:
                        failed = await self._guard.call("write", self._state.write(pool, batch), WRITE_SLACK,
                                                        in_backoff=True) is None
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
