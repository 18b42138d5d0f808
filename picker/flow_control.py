"""Flow control: while a pool is saturated, requests wait in the gateway, not on the pods.

A pool is saturated when no endpoint has room (saturation.has_room: the endpoint's
waiting queue, as scraped or as estimated from the requests in flight there since,
is below the pool's threshold, and so is its KV-cache use). A request that finds
its pool saturated, or finds others already waiting, takes a ticket in the pool's
queue; one with a negative priority (Sheddable) is refused 429 at once instead.

The queue is one per pool in Redis, shared by every replica (scripts.ENQUEUE):
priority first, then round robin between tenants (the fairness id), FIFO within
one. Whenever room may have freed (a request of this replica ended, a fresher
load sample, a tick), a replica computes the pool's room over every replica's
in-flight requests and lets that many through from the head (scripts.DISPATCH),
whichever replica each belongs to: the owner hears it by pub/sub, and then places
the request with the normal scheduler. So a Critical request waiting at replica A
goes before a Standard one that waited longer at replica B. A request waits at
most its time-to-live (the model's, else the pool's), then gets a 503; a client
that goes away leaves the queue at once; a dead replica's tickets are skipped once
its lease ends, and a grant it never used lapses, so nobody else loses a place.

If Redis cannot answer, new requests wait in this replica's own queue (the same
order, over this replica's requests only) until it can. With `--state local`
(the upstream baseline) that per-replica queue is the only one.

It is a gate the director passes a request through (`picker/director.py`): placed
at once while the pool has room and nobody waits, else it waits for its `turn`;
the director tells it when a request ends (`released`), as room may have freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from gateway_state.queue_store import QueueStore
from picker.errors import GatewayError, QueueFull, QueueTimeout, Shed
from picker.intake import PlacementRequest
from picker.metrics import PickerMetrics
from picker.placement import Placement
from picker.settings import PickerSettings
from picker.snapshot import SnapshotSource
from picker.state_guard import STATE_ERRORS, StateGuard

log = logging.getLogger("picker.flow")


class Queue(Protocol):
    async def enqueue(self, pool: str, replica: str, priority: int, tenant: str, ttl_ms: int,
                      max_queued: int) -> str | None: ...

    async def dispatch(self, pool: str, replica: str, room: int, grant_ms: int,
                       reserve: int = 0) -> tuple[list[tuple[str, str]], int]:
        ...

    async def leave(self, pool: str, ticket: str) -> str: ...


@dataclass
class _Entry:
    priority: int
    tenant: str
    deadline: float  # monotonic s


@dataclass
class _Level:
    """One priority's waiting requests: a FIFO per tenant, and each tenant's turn."""

    fifos: dict[str, deque[str]] = field(default_factory=dict)
    turns: dict[str, int] = field(default_factory=dict)
    served: int = 0  # the turn last served

    def next_tenant(self) -> str:
        return min(self.turns, key=lambda t: (self.turns[t], t))


@dataclass
class _PoolQueue:
    levels: dict[int, _Level] = field(default_factory=dict)  # priority -> its waiting requests
    entries: dict[str, _Entry] = field(default_factory=dict)  # waiting tickets
    grants: dict[str, float] = field(default_factory=dict)  # granted ticket -> expiry (monotonic s)


class MemoryQueue:
    """The same queue in this replica's memory: its own requests only (the fallback, and the
    per-replica baseline). Same order as the shared queue (scripts.ENQUEUE): priority, then tenants
    in turn, FIFO within one."""

    def __init__(self) -> None:
        self._pools: dict[str, _PoolQueue] = {}
        self._seq = itertools.count(1)

    async def enqueue(self, pool: str, replica: str, priority: int, tenant: str, ttl_ms: int,
                      max_queued: int) -> str | None:
        q = self._pools.setdefault(pool, _PoolQueue())
        if len(q.entries) >= max_queued:
            return None
        ticket = f"local-{next(self._seq)}"
        q.entries[ticket] = _Entry(priority, tenant, time.monotonic() + ttl_ms / 1000)
        level = q.levels.setdefault(priority, _Level())
        level.fifos.setdefault(tenant, deque()).append(ticket)
        level.turns.setdefault(tenant, level.served + 1)
        return ticket

    async def dispatch(self, pool: str, replica: str, room: int, grant_ms: int,
                       reserve: int = 0) -> tuple[list[tuple[str, str]], int]:
        q = self._pools.get(pool)
        if q is None:
            return [], 0
        now = time.monotonic()
        for t in [t for t, end in q.grants.items() if end <= now]:
            del q.grants[t]
        free, out, dropped = room - len(q.grants), [], 0
        while free > 0 and q.levels:
            priority = max(q.levels)
            if priority <= 0 and free <= reserve:  # the reserve is for positive priorities
                break
            level = q.levels[priority]
            tenant = level.next_tenant()
            turn = level.turns[tenant]
            fifo = level.fifos[tenant]
            ticket = fifo.popleft()
            entry = q.entries.pop(ticket)
            if entry.deadline <= now:
                dropped += 1  # no turn spent
            else:
                level.served, turn = turn, turn + 1
                q.grants[ticket] = now + grant_ms / 1000
                out.append((replica, ticket))
                free -= 1
            if fifo:
                level.turns[tenant] = turn
            else:
                self._tenant_done(q, priority, tenant)
        return out, dropped

    async def leave(self, pool: str, ticket: str) -> str:
        q = self._pools.get(pool)
        if q is None:
            return "gone"
        entry = q.entries.pop(ticket, None)
        if entry is not None:
            fifo = q.levels[entry.priority].fifos[entry.tenant]
            fifo.remove(ticket)
            if not fifo:
                self._tenant_done(q, entry.priority, entry.tenant)
            return "waiting"
        return "granted" if q.grants.pop(ticket, None) is not None else "gone"

    def waiting(self, pool: str) -> int:
        q = self._pools.get(pool)
        return len(q.entries) if q else 0

    @staticmethod
    def _tenant_done(q: _PoolQueue, priority: int, tenant: str) -> None:
        level = q.levels[priority]
        del level.fifos[tenant], level.turns[tenant]
        if not level.turns:
            del q.levels[priority]


@dataclass
class _Waiter:
    pool: str
    ticket: str
    queue: Queue
    priority: int
    tenant: str
    deadline: float  # monotonic s
    granted: asyncio.Future[None]
    left: bool = False  # it left the queue already (a deadline checked against a racing grant)


class FlowController:
    def __init__(self, fleet: QueueStore | None, placement: Placement, snapshots: SnapshotSource,
                 settings: PickerSettings, metrics: PickerMetrics, guard: StateGuard) -> None:
        """`placement`: asked how much room a pool has (its view of every replica's requests in flight);
        `guard`: this queue's own, apart from placement's (a failed queue call holds back queue calls)."""
        self._fleet = fleet  # None: per-replica queues only (state mode "local")
        self._local = MemoryQueue()
        self._placement = placement
        self._snapshots = snapshots
        self._settings = settings
        self._metrics = metrics
        self._me = settings.server.replica_id
        self._waiters: dict[tuple[str, str], _Waiter] = {}  # (pool, ticket) -> this replica's waiting request
        self._dispatching: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()  # pools whose room changed while a dispatch was under way
        self._guard = guard
        self._orphans: list[tuple[str, str]] = []  # (pool, ticket) left in Redis by requests moved here

    # -- the request path ---------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self._settings.flow.enabled

    def shed(self, request: PlacementRequest) -> None:
        """A request of negative priority refused on a saturated pool (429), counted."""
        self._count(request.pool.name, request.priority, "shed", 0.0)

    @contextlib.asynccontextmanager
    async def turn(self, request: PlacementRequest) -> AsyncIterator[None]:
        """Wait for the request's turn in its pool's queue, then let the director place it inside the block.
        Raises Shed (a negative priority is never queued), QueueFull, or QueueTimeout past its TTL."""
        pool, priority = request.pool, request.priority
        if priority < 0:
            self.shed(request)
            raise Shed(f"Pool {pool.name} is saturated; requests of negative priority (Sheddable) are refused "
                       "until load drops.")
        ttl_ms = request.queue_ttl_ms or pool.flow.queue_ttl_ms
        waiter = await self._enqueue(pool.name, priority, request.tenant[:self._settings.flow.max_tenant_chars],
                                     ttl_ms, pool.flow.max_queued)
        started = time.monotonic()
        try:
            await self._wait(waiter, ttl_ms)
            yield
        except QueueTimeout:
            self._count(pool.name, priority, "expired", time.monotonic() - started)
            raise
        except asyncio.CancelledError:  # the client went away: its place goes at once
            self._count(pool.name, priority, "cancelled", time.monotonic() - started)
            raise
        except GatewayError:
            self._count(pool.name, priority, "failed", time.monotonic() - started)
            raise
        finally:
            self._waiters.pop((waiter.pool, waiter.ticket), None)
            if not waiter.left:  # drops the grant (its request is counted in flight now) or the ticket
                self._guard.later(self._leave(waiter))
        self._count(pool.name, priority, "dispatched", time.monotonic() - started)

    def someone_waits(self, pool: str) -> bool:
        """Requests of `pool` wait for room already (here or at another replica): a new one queues behind."""
        return self._snapshots.current.queued.get(pool, 0) > 0 or self._local.waiting(pool) > 0 or any(
            w.pool == pool for w in self._waiters.values())

    async def _enqueue(self, pool: str, priority: int, tenant: str, ttl_ms: int, max_queued: int) -> _Waiter:
        queue: Queue = self._local
        ticket = None
        if self._fleet_usable():
            assert self._fleet is not None
            try:
                async with asyncio.timeout(self._settings.state.redis_timeout_ms * 10 / 1000):
                    ticket = await self._fleet.enqueue(pool, self._me, priority, tenant, ttl_ms, max_queued)
                queue = self._fleet
                if ticket is None:
                    self._count(pool, priority, "rejected", 0.0)
                    raise QueueFull(f"Pool {pool} is saturated and {max_queued} requests already wait; retry later.")
            except STATE_ERRORS as exc:
                self._fleet_failed("enqueue", exc)
        if queue is self._local:
            ticket = await self._local.enqueue(pool, self._me, priority, tenant, ttl_ms, max_queued)
            if ticket is None:
                self._count(pool, priority, "rejected", 0.0)
                raise QueueFull(f"Pool {pool} is saturated and {max_queued} requests already wait; retry later.")
        assert ticket is not None
        waiter = _Waiter(pool, ticket, queue, priority, tenant, time.monotonic() + ttl_ms / 1000,
                         asyncio.get_running_loop().create_future())
        self._waiters[(pool, ticket)] = waiter
        self._metrics.flow_waiting.labels(pool, str(priority)).inc()
        waiter.granted.add_done_callback(lambda _: self._metrics.flow_waiting.labels(pool, str(priority)).dec())
        self.kick(pool)
        return waiter

    async def _wait(self, waiter: _Waiter, ttl_ms: int) -> None:
        try:
            async with asyncio.timeout(ttl_ms / 1000):
                await asyncio.shield(waiter.granted)
        except TimeoutError:
            # A grant may have raced the deadline: then the request still goes.
            if await self._leave(waiter) != "granted":
                raise QueueTimeout(f"The request waited {ttl_ms / 1000:g} s for room in pool {waiter.pool}, which "
                                   "stayed saturated; retry later.") from None
        finally:
            if not waiter.granted.done():
                waiter.granted.cancel()

    async def _leave(self, waiter: _Waiter) -> str:
        waiter.left = True
        try:
            async with asyncio.timeout(self._settings.state.redis_timeout_ms * 10 / 1000):
                return await waiter.queue.leave(waiter.pool, waiter.ticket)
        except STATE_ERRORS as exc:  # the grant lapses, the ticket is dropped when it surfaces
            self._fleet_failed("leave", exc)
            return "gone"

    # -- letting requests through ---------------------------------------------------

    def kick(self, pool: str) -> None:
        """Room may have freed in `pool`: let waiting requests through (one dispatch at a time per pool)."""
        task = self._dispatching.get(pool)
        if task is not None and not task.done():
            self._again.add(pool)
            return
        task = asyncio.get_running_loop().create_task(self._dispatch(pool))
        self._dispatching[pool] = task

    def released(self, pool: str) -> None:
        """A request placed in `pool` ended (or its placement failed): room may have freed."""
        if self.someone_waits(pool):
            self.kick(pool)

    async def _dispatch(self, pool_name: str) -> None:
        while True:
            self._again.discard(pool_name)
            try:
                await self._dispatch_once(pool_name)
            except Exception:  # noqa: BLE001 (a background task: log, the next tick retries)
                log.exception("letting waiting requests through pool %s failed", pool_name)
            if pool_name not in self._again:
                return

    async def _dispatch_once(self, pool_name: str) -> None:
        snapshot = self._snapshots.current
        pool = snapshot.config.pools.get(pool_name) if snapshot.config else None
        if pool is None:
            return
        room = await self._placement.room(pool, snapshot.load.get(pool_name, {}),
                                          snapshot.drained.get(pool_name, frozenset()))
        if room <= 0:
            return
        grant_ms = self._settings.flow.grant_ms
        reserve = pool.flow.priority_reserve
        granted, dropped = await self._local.dispatch(pool_name, self._me, room, grant_ms, reserve)
        room -= len(granted)
        if (self._fleet is not None and room > 0 and self._fleet_usable()
                and (snapshot.queued.get(pool_name, 0) > 0
                     or any(w.queue is self._fleet and w.pool == pool_name for w in self._waiters.values()))):
            try:
                async with asyncio.timeout(self._settings.state.redis_timeout_ms * 10 / 1000):
                    fleet_granted, fleet_dropped = await self._fleet.dispatch(pool_name, self._me, room, grant_ms,
                                                                              reserve)
                granted, dropped = granted + fleet_granted, dropped + fleet_dropped
            except STATE_ERRORS as exc:
                self._fleet_failed("dispatch", exc)
        if dropped:
            self._metrics.flow_dropped.labels(pool_name).inc(dropped)
        for owner, ticket in granted:
            if owner == self._me:
                self._grant(pool_name, ticket)

    def _grant(self, pool: str, ticket: str) -> None:
        waiter = self._waiters.get((pool, ticket))
        if waiter is not None and not waiter.granted.done():
            waiter.granted.set_result(None)

    # -- background: grants from other replicas, and the tick -----------------------

    async def listen(self, stop: asyncio.Event) -> None:
        """Hear the grants other replicas send this one, reconnecting after a failure."""
        if self._fleet is None:
            return
        backoff = 0.1
        while not stop.is_set():
            try:
                async for pool, ticket in self._fleet.grants(self._me):
                    self._grant(pool, ticket)
                    backoff = 0.1
            except STATE_ERRORS as exc:
                log.debug("grant channel lost, reconnecting: %s", exc)
            await asyncio.sleep(backoff)
            backoff = min(2.0, backoff * 2)

    async def tick(self) -> None:
        """After each snapshot refresh (a fresher load sample): let requests through where any wait.
        While Redis cannot answer, this replica's requests waiting there move to its own queue."""
        if self._fleet is not None and not self._fleet_usable():
            await self._move_to_local()
        snapshot = self._snapshots.current
        for pool in {p for p, n in snapshot.queued.items() if n > 0} | {w.pool for w in self._waiters.values()}:
            self.kick(pool)

    async def _move_to_local(self) -> None:
        """Requests waiting in Redis's queue keep their order here, among this replica's own, until Redis
        answers; their tickets there are removed then (until that, a grant for one lapses unused)."""
        for key, w in list(self._waiters.items()):
            if w.queue is not self._fleet or w.granted.done():
                continue
            remaining_ms = max(1, int((w.deadline - time.monotonic()) * 1000))
            ticket = await self._local.enqueue(w.pool, self._me, w.priority, w.tenant, remaining_ms, 1 << 62)
            assert ticket is not None  # no size limit for requests already admitted to the queue
            del self._waiters[key]
            self._orphans.append((w.pool, w.ticket))
            w.queue, w.ticket = self._local, ticket
            self._waiters[(w.pool, ticket)] = w
            self.kick(w.pool)

    async def poll(self) -> None:
        """Check this replica's waiting tickets in Redis, in case a grant message was lost."""
        if self._fleet is None or not self._fleet_usable():
            return
        while self._orphans:
            pool, ticket = self._orphans[-1]
            try:
                await self._fleet.leave(pool, ticket)
            except STATE_ERRORS as exc:
                self._fleet_failed("leave", exc)
                return
            self._orphans.pop()
        mine: dict[str, list[str]] = {}
        for w in self._waiters.values():
            if w.queue is self._fleet and not w.granted.done():
                mine.setdefault(w.pool, []).append(w.ticket)
        for pool, tickets in mine.items():
            try:
                states = await self._fleet.ticket_states(pool, tickets)
            except STATE_ERRORS as exc:
                self._fleet_failed("poll", exc)
                return
            for ticket, state in states.items():
                # Gone: its queue was lost (Redis flushed or failed over); it goes rather than wait for nothing.
                if state in ("granted", "gone"):
                    self._grant(pool, ticket)

    def _fleet_usable(self) -> bool:
        """The shared queue is worth asking: Redis answered the last snapshot and no queue call just failed."""
        return self._fleet is not None and self._snapshots.redis_ok and self._guard.usable

    def _fleet_failed(self, op: str, exc: BaseException) -> None:
        self._guard.failed(op, exc)  # new requests queue in this replica meanwhile

    def _count(self, pool: str, priority: int, outcome: str, waited_s: float) -> None:
        self._metrics.flow_requests.labels(pool, str(priority), outcome).inc()
        if outcome not in ("shed", "rejected"):
            self._metrics.flow_wait_seconds.labels(pool, str(priority), outcome).observe(waited_s)

    def waiting_here(self) -> list[dict[str, object]]:
        """This replica's waiting requests, for the admin API."""
        return [{"pool": w.pool, "ticket": w.ticket, "priority": w.priority,
                 "queue": "fleet" if w.queue is self._fleet else "local"} for w in self._waiters.values()]

