"""The placement state: one protocol, kept in Redis (`gateway_state.StateStore`) or in memory here.

A replica's own in-flight figures are the truth (`OwnRequests`): exact, seen at
once by its concurrent decisions, and published whole to the state on every
heartbeat, which overwrites whatever an interrupted admission or release left
there. The state adds what other replicas contribute: their in-flight figures
and the prefix index. `MemoryState` is the same state for one replica alone, as
upstream pickers keep it (forgotten on restart); in Redis mode a second one is
the fallback index used while Redis cannot answer.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway_state.placement_store import (
    PLAIN_CHECK,
    WORK_SUFFIX,
    IndexWrite,
    Option,
    ReleaseWrite,
    SharedView,
    SpeculativeWrite,
    Weighing,
    Write,
    model_field,
    model_figures,
    prefill_left,
    split_figures,
    weigh,
)

# A replica's own record of its speculative placements, while Redis cannot be reached, is bounded so.
SPECULATIVE_CAPACITY = 100_000

# How many of a pool's latest admissions a replica remembers, to add those a lookup did not see yet
# (OwnRequests.work_since): far more than a burst admits while one lookup is under way.
RECENT_ADMISSIONS = 256


class PlacementState(Protocol):
    # Whether an admission carries its decision's index write (`admit`'s `after`) in the same round trip;
    # where it does not (a Redis Cluster), the caller sends it after, off the request path.
    index_rides_admission: bool

    async def lookup(self, pool: str, block_hashes: Sequence[str], leave_out: str = "",
                     speculative: bool = False, releases: Sequence[ReleaseWrite] = ()) -> SharedView:
        """In-flight figures of the live replicas but `leave_out`, each endpoint's matched blocks, live replicas;
        `releases` applied first, at once."""
        ...

    def admit(self, pool: str, replica: str, options: Sequence[Option], lease_ms: int, model: str = "",
              weighing: Weighing = PLAIN_CHECK, before: Sequence[Write] = (),
              after: Sequence[Write] = ()) -> Awaitable[int]:
        """Count a request in flight at one of `options`, as `weighing` picks it on the pool's figures now
        (`replica`'s own included), and add its blocks to that endpoint's prefill backlog (drained at the
        option's speed, 0 unknown). Returns the option's place from 1; 0 (nothing of its own written) when
        none is admitted. At once: the writes `before` (whatever happens) and `after` (if the first option is
        admitted). A coroutine, or a future of a call already sent."""
        ...

    async def index(self, pool: str, endpoint: str, block_hashes: Sequence[str], prefix_ttl_ms: int,
                    capacity_blocks: int, held_blocks: int = 0) -> int:
        """`endpoint` holds the blocks now, in an LRU of `capacity_blocks`, and held the first `held_blocks`
        at the decision; returns how many were evicted."""
        ...

    async def release(self, pool: str, replica: str, endpoint: str, work_blocks: int = 0,
                      model: str = "") -> None: ...

    async def write(self, pool: str, writes: Sequence[Write]) -> int:
        """Index writes and releases, in order, at once; returns how many blocks the index writes evicted."""
        ...

    async def publish(self, pool: str, replica: str, lease_ms: int, figures: Mapping[str, int] | None) -> None:
        """Replace the replica's in-flight figures with `figures` (None: keep them) and renew its lease."""
        ...


@dataclass
class RecentAdmission:
    """One of a replica's latest admissions, in the order they were sent (OwnRequests.work_since)."""

    seq: int
    endpoint: str
    work_blocks: int  # its uncached prompt blocks; 0 once the admission was refused or cancelled


class OwnRequests:
    """This replica's requests in flight, per pool and endpoint, and their uncached prompt blocks."""

    def __init__(self) -> None:
        self._counts: dict[str, Counter[str]] = {}  # pool -> endpoint (and endpoint|work) -> amount
        self._seq = 0  # one more per request added, in the order their admissions are sent
        self._recent: dict[str, deque[RecentAdmission]] = {}  # pool -> the latest admissions, newest last

    def add(self, pool: str, endpoint: str, work_blocks: int, model: str = "") -> RecentAdmission:
        _count(self._counts.setdefault(pool, Counter()), endpoint, work_blocks, model)
        self._seq += 1
        admission = RecentAdmission(self._seq, endpoint, work_blocks)
        self._recent.setdefault(pool, deque(maxlen=RECENT_ADMISSIONS)).append(admission)
        return admission

    def remove(self, pool: str, endpoint: str, work_blocks: int, model: str = "",
               refused: RecentAdmission | None = None) -> None:
        """A request ended, or its admission (`refused`, as `add` returned it) was refused or cancelled:
        then it adds no work to the lookups that did not see it either."""
        _uncount(self._counts.get(pool), endpoint, work_blocks, model)
        if refused is not None:
            refused.work_blocks = 0

    def mark(self) -> int:
        """Where the admissions stand now: taken when a lookup is sent, for `work_since`."""
        return self._seq

    def work_since(self, pool: str, mark: int) -> dict[str, int]:
        """Per endpoint, the uncached blocks of this replica's requests added after `mark`. A lookup
        sent at `mark` went out behind the admissions added before it on the same connection, so the
        prefill backlog it read holds those and none of these."""
        out: dict[str, int] = {}
        for a in reversed(self._recent.get(pool, ())):
            if a.seq <= mark:
                break
            if a.work_blocks:
                out[a.endpoint] = out.get(a.endpoint, 0) + a.work_blocks
        return out

    def figures(self, pool: str) -> dict[str, int]:
        """The fields of this replica's in-flight record, as the state stores them."""
        return dict(self._counts.get(pool, {}))

    def pools(self) -> list[str]:
        return list(self._counts)

    def total(self, pool: str) -> int:
        return sum(split_figures(self._counts.get(pool, {}))[0].values())


class MemoryState:
    """The placement state in this process's memory; leases run on its monotonic clock."""

    index_rides_admission = True

    def __init__(self) -> None:
        self._figures: dict[str, dict[str, Counter[str]]] = {}  # pool -> replica -> in-flight record
        self._expiry: dict[str, dict[str, float]] = {}  # pool -> replica -> lease end (monotonic s)
        self._holders: dict[str, dict[str, set[str]]] = {}  # pool -> block hash -> endpoints holding it
        self._lru: dict[tuple[str, str], OrderedDict[str, None]] = {}  # (pool, endpoint) -> blocks, oldest first
        self._backlog: dict[str, dict[str, tuple[float, float]]] = {}  # pool -> endpoint -> (blocks, monotonic s)

    def _live(self, pool: str) -> list[str]:
        now = time.monotonic()
        expiry = self._expiry.get(pool, {})
        for replica in [r for r, end in expiry.items() if end <= now]:
            del expiry[replica]
            self._figures.get(pool, {}).pop(replica, None)
        return sorted(expiry)

    async def lookup(self, pool: str, block_hashes: Sequence[str], leave_out: str = "",
                     speculative: bool = False, releases: Sequence[ReleaseWrite] = ()) -> SharedView:
        await self._apply(pool, releases)
        replicas = self._live(pool)
        total: Counter[str] = Counter()
        for replica in replicas:
            if replica != leave_out:
                total.update(self._figures.get(pool, {}).get(replica, {}))
        requests, work = split_figures(total)
        now = time.monotonic()
        backlog = {e: (blocks, int((now - at) * 1000)) for e, (blocks, at) in self._backlog.get(pool, {}).items()}
        return SharedView(requests, self.matched(pool, block_hashes), work, model_figures(total), backlog)

    def matched(self, pool: str, block_hashes: Sequence[str]) -> dict[str, int]:
        matched: dict[str, int] = {}
        holders = self._holders.get(pool, {})
        for depth, h in enumerate(block_hashes, start=1):
            endpoints = holders.get(h)
            if not endpoints:
                break
            for e in endpoints:
                matched[e] = depth
        return matched

    async def admit(self, pool: str, replica: str, options: Sequence[Option], lease_ms: int, model: str = "",
                    weighing: Weighing = PLAIN_CHECK, before: Sequence[Write] = (),
                    after: Sequence[Write] = ()) -> int:
        await self._apply(pool, before)
        records = self._figures.get(pool, {})
        total: Counter[str] = Counter()
        for r in self._live(pool):
            total.update(records.get(r, {}))
        requests, work = split_figures(total)
        place = weigh(options, weighing, requests, work)
        if place == 0:
            return 0
        chosen = options[place - 1]
        endpoint, work_blocks = chosen.endpoint, chosen.work_blocks
        _count(self._figures.setdefault(pool, {}).setdefault(replica, Counter()), endpoint, work_blocks, model)
        now = time.monotonic()
        self._expiry.setdefault(pool, {})[replica] = now + lease_ms / 1000
        if work_blocks > 0:
            backlogs = self._backlog.setdefault(pool, {})
            blocks, at = backlogs.get(endpoint, (0.0, now))
            left = prefill_left(blocks, int((now - at) * 1000), chosen.blocks_per_s)
            backlogs[endpoint] = ((0.0 if left is None else left) + work_blocks, now)
        if place == 1:
            await self._apply(pool, after)
        return place

    async def index(self, pool: str, endpoint: str, block_hashes: Sequence[str], prefix_ttl_ms: int,
                    capacity_blocks: int, held_blocks: int = 0) -> int:
        """An exact LRU: in memory every block's recency is written, held or not."""
        holders = self._holders.setdefault(pool, {})
        lru = self._lru.setdefault((pool, endpoint), OrderedDict())
        # Deepest first, so the shallow blocks are the most recent and leaves are evicted first.
        for h in reversed(block_hashes):
            holders.setdefault(h, set()).add(endpoint)
            lru[h] = None
            lru.move_to_end(h)
        evicted = 0
        while len(lru) > capacity_blocks:
            h, _ = lru.popitem(last=False)
            evicted += 1
            endpoints = holders.get(h)
            if endpoints is not None:
                endpoints.discard(endpoint)
                if not endpoints:
                    del holders[h]
        return evicted

    def forget_endpoint(self, pool: str, endpoint: str) -> None:
        """The endpoint's server restarted: it holds none of the blocks the index noted for it."""
        lru = self._lru.pop((pool, endpoint), None)
        holders = self._holders.get(pool, {})
        for h in lru or ():
            endpoints = holders.get(h)
            if endpoints is not None:
                endpoints.discard(endpoint)
                if not endpoints:
                    del holders[h]

    async def release(self, pool: str, replica: str, endpoint: str, work_blocks: int = 0, model: str = "") -> None:
        _uncount(self._figures.get(pool, {}).get(replica), endpoint, work_blocks, model)

    async def write(self, pool: str, writes: Sequence[Write]) -> int:
        return await self._apply(pool, writes)

    async def _apply(self, pool: str, writes: Sequence[Write]) -> int:
        evicted = 0
        for w in writes:
            if isinstance(w, IndexWrite):
                evicted += await self.index(pool, w.endpoint, w.block_hashes, w.prefix_ttl_ms, w.capacity_blocks)
            elif isinstance(w, SpeculativeWrite):  # held here until its time passes: no engine event comes here
                evicted += await self.index(pool, w.endpoint, w.block_hashes, w.ttl_ms, SPECULATIVE_CAPACITY)
            else:
                await self.release(pool, w.replica, w.endpoint, w.work_blocks, w.model)
        return evicted

    async def publish(self, pool: str, replica: str, lease_ms: int, figures: Mapping[str, int] | None) -> None:
        if figures is not None:
            self._figures.setdefault(pool, {})[replica] = Counter({k: v for k, v in figures.items() if v > 0})
        self._expiry.setdefault(pool, {})[replica] = time.monotonic() + lease_ms / 1000
        self._live(pool)


def _count(record: Counter[str], endpoint: str, work_blocks: int, model: str) -> None:
    """One request, its uncached prompt blocks and its model, in flight at `endpoint` in an in-flight record."""
    record[endpoint] += 1
    if work_blocks > 0:
        record[endpoint + WORK_SUFFIX] += work_blocks
    if model:
        record[model_field(endpoint, model)] += 1


def _uncount(record: Counter[str] | None, endpoint: str, work_blocks: int, model: str) -> None:
    """The request ended; figures never go below zero (a record replaced meanwhile has none)."""
    if record is None:
        return
    for name, amount in ((endpoint, 1), (endpoint + WORK_SUFFIX, work_blocks),
                         (model_field(endpoint, model), 1 if model else 0)):
        if amount > 0 and name in record:
            record[name] -= amount
            if record[name] <= 0:
                del record[name]
