"""Placing a request: view the state, schedule, admit; later index its prompt and release it.

`plan` reads the state and schedules, with no side effect; `commit` admits the
plan; `place` does both, once more if another replica took the endpoint in
between. This replica's own in-flight figures (`OwnRequests`) are the truth:
they change at once and synchronously, so a cancelled request never leaves a
count behind, and every heartbeat publishes them whole to the state. A state
call that fails or misses its deadline falls back to those figures and to the
replica's own prefix index; nothing fails because Redis is slow or gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, replace

from redis.exceptions import RedisError

from gateway_state.clock import FleetClock
from gateway_state.records import LoadSample, Pool
from gateway_state.store import (
    IndexWrite,
    ReleaseWrite,
    SharedView,
    Write,
    model_field,
    model_figures,
    prefill_left,
    split_figures,
)
from picker.errors import GatewayError, Shed
from picker.intake import PlacementRequest
from picker.metrics import PickerMetrics
from picker.plugins.filters import estimated_waiting, free_slots, has_room
from picker.plugins.framework import Candidate
from picker.plugins.pickers import replica_share
from picker.prefix import capacity_blocks
from picker.roles import Role, RoleRequest
from picker.scheduler import Decision, Scheduler, Trace
from picker.settings import PickerSettings
from picker.state import MemoryState, OwnRequests, PlacementState

log = logging.getLogger("picker")
_STATE_ERRORS = (RedisError, OSError, TimeoutError)
# The most one round trip of writes carries, in blocks indexed plus requests released: about 2.5 ms of
# Lua at the measured 10 us per indexed block, so a burst of writes never stalls Redis for long.
MAX_WRITE_BATCH = 256


@dataclass(frozen=True)
class Plan:
    request: PlacementRequest
    decision: Decision
    work_blocks: int  # the prompt's blocks the chosen endpoint must compute
    others_seen: int  # the other replicas' requests at the chosen endpoint in the view; -1 unknown
    saturated: bool = False  # no candidate had room in the view (flow control queues the request)

    @property
    def chosen(self) -> Candidate:
        return self.decision.endpoints[0]


@dataclass(frozen=True)
class EndpointRoom:
    inflight: int  # the fleet's requests there now
    estimated_waiting: float | None  # its queue now (filters.estimated_waiting); None: no fresh sample
    has_room: bool  # below the saturation thresholds: a request arriving while none waits goes there
    free_slots: int  # waiting requests the release rule lets through to it now


@dataclass(frozen=True)
class Placed:
    request: PlacementRequest
    endpoints: list[Candidate]  # chosen first, then fallbacks
    work_blocks: int
    admitted_shared: bool  # the state counted it, so the state releases it
    decision_seconds: float  # body parsed to admission, state round trips included
    schedule_seconds: float  # the scheduling runner alone

    @property
    def chosen(self) -> Candidate:
        return self.endpoints[0]

    @property
    def pool(self) -> str:
        return self.request.pool.name


@dataclass(frozen=True)
class Placements:
    """One request's placements by role (the primary always), and the optional ones dropped."""

    placed: dict[Role, Placed]
    dropped: list[tuple[RoleRequest, GatewayError]]

    @property
    def primary(self) -> Placed:
        return self.placed[Role.PRIMARY]

    @property
    def prefix_holder(self) -> Placed:
        """The placement that computes the prompt: an SGLang PD pool's prefill, else the primary."""
        return self.placed.get(Role.PREFILL) or self.primary


class Saturated(Exception):
    """The pool has no room for the request now: flow control queues it (not an answer to the client)."""


class Placement:
    def __init__(self, state: PlacementState, fallback_index: MemoryState | None, scheduler: Scheduler,
                 settings: PickerSettings, metrics: PickerMetrics, clock: FleetClock) -> None:
        self._state = state
        self._fallback = fallback_index  # None when the state is this replica's memory already
        self._scheduler = scheduler
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._me = settings.server.replica_id
        self._state_down_until = 0.0  # monotonic; before it, the state is not asked (see StateSettings)
        self.own = OwnRequests()
        self._background: set[asyncio.Task[None]] = set()
        self._pending: dict[str, list[Write]] = {}  # pool -> writes not yet sent
        self._writing: set[str] = set()  # pools whose writer task runs
        # Told the pool each time a request of this replica ends: room may have freed (flow control).
        self.on_release: Callable[[str], None] | None = None

    async def place_roles(self, roles: list[RoleRequest], load: dict[str, dict[str, LoadSample]],
                          drained: dict[str, frozenset[str]], gate: bool = False,
                          released: bool = False) -> Placements:
        """Place every role at once, each in its own pool's state. A required role that fails fails the
        decision (the others are released); an optional one (a mirror) is dropped, and so it is at once
        when its pool is saturated: copies never add to a full pool's queues. `gate`: raise Saturated,
        placing nothing, when the primary's pool has no room (flow control then queues the request)."""
        dropped: list[tuple[RoleRequest, GatewayError]] = []
        for r in [r for r in roles if r.optional]:
            if self.saturated(r.request.pool, load.get(r.request.pool.name, {})):
                roles = [x for x in roles if x is not r]
                dropped.append((r, Shed(f"Pool {r.request.pool.name} is saturated.")))
        placing = [self.place(r.request, load.get(r.request.pool.name, {}),
                              drained.get(r.request.pool.name, frozenset()), r.profile,
                              gate and r.role == Role.PRIMARY, released and r.role == Role.PRIMARY) for r in roles]
        if len(placing) == 1:  # the usual request: no task for gather to schedule
            results: list[Placed | BaseException] = [await placing[0]]
        else:
            results = await asyncio.gather(*placing, return_exceptions=True)
        placed: dict[Role, Placed] = {}
        failure: BaseException | None = None
        for role, result in zip(roles, results, strict=True):
            if isinstance(result, Placed):
                placed[role.role] = result
            elif role.optional and isinstance(result, GatewayError):
                dropped.append((role, result))
            elif failure is None or isinstance(failure, GatewayError):
                failure = result  # a fault of ours outranks a client-facing error
        if failure is not None:
            for p in placed.values():
                self.release(p)
            raise failure
        return Placements(placed, dropped)

    async def place(self, request: PlacementRequest, samples: dict[str, LoadSample],
                    drained: frozenset[str] = frozenset(), profile: str | None = None, gate: bool = False,
                    released: bool = False) -> Placed:
        """`gate`: raise Saturated when the pool has no room; `released`: the request was let through
        flow control's queue, so it goes to an endpoint that can start it now (if any can)."""
        started = time.perf_counter()
        # At most two rounds: the second when another replica took the chosen endpoint meanwhile.
        for check in (True, False):
            plan = await self.plan(request, samples, check, drained, profile=profile, released=released)
            if gate and plan.saturated:
                raise Saturated(request.pool.name)
            placed = await self.commit(plan, started)
            if placed is not None:
                break
            self._metrics.placement_conflicts.labels(request.pool.name).inc()
        assert placed is not None  # an unchecked commit always admits
        if request.block_hashes:
            self._write_later(request.pool.name, IndexWrite(
                plan.chosen.endpoint.key, request.block_hashes, self._settings.prefix.ttl_ms,
                self.capacity_blocks(plan.chosen.load)))
        return placed

    async def plan(self, request: PlacementRequest, samples: dict[str, LoadSample], check: bool = True,
                   drained: frozenset[str] = frozenset(), trace: Trace | None = None,
                   profile: str | None = None, released: bool = False) -> Plan:
        """The decision the state supports now; reads only (so it also explains decisions)."""
        pool = request.pool
        try:
            self._check_state()
            async with asyncio.timeout(self._settings.state.redis_timeout_ms / 1000):
                others: SharedView | None = await self._state.lookup(pool.name, request.block_hashes, self._me)
        except _STATE_ERRORS as exc:
            self._state_failed("lookup", exc)
            others = None
        # Read after the await: decisions this replica made meanwhile must count.
        own = self.own.figures(pool.name)
        (own_requests, own_work), own_models = split_figures(own), model_figures(own)
        if others is None:
            matched = self._fallback.matched(pool.name, request.block_hashes) if self._fallback else {}
            view = SharedView(own_requests, matched, own_work, inflight_models=own_models)
        else:
            view = SharedView(dict(Counter(others.inflight) + Counter(own_requests)), others.matched_blocks,
                              dict(Counter(others.inflight_work) + Counter(own_work)), others.replicas,
                              dict(Counter(others.inflight_models) + Counter(own_models)), others.prefill_backlog)
        scheduling = replace(request.scheduling, preferred=replica_share(
            [e.key for e in pool.endpoints], view.replicas, self._me))
        candidates = self._candidates(pool, samples, view, drained, scheduling.model)
        if released:
            unknown = self._settings.flow.unknown_endpoint_room
            candidates = [c for c in candidates if free_slots(c.load, c.inflight, pool.flow, unknown) > 0] or candidates
        decision = self._scheduler.schedule(profile or pool.strategy, scheduling, candidates, trace)
        chosen = decision.endpoints[0]
        seen = others.inflight.get(chosen.endpoint.key, 0) if check and others is not None else -1
        return Plan(request, decision, max(0, scheduling.work_blocks - chosen.matched_blocks), seen,
                    not any(c.room for c in candidates if not c.draining))

    async def room(self, pool: Pool, samples: dict[str, LoadSample], drained: frozenset[str] = frozenset()) -> int:
        """How many waiting requests the pool can take now by flow control's release rule (filters.free_slots),
        over every replica's in-flight requests (this replica's own alone while the state cannot answer)."""
        return sum(r.free_slots for r in (await self.room_by_endpoint(pool, samples, drained)).values())

    async def room_by_endpoint(self, pool: Pool, samples: dict[str, LoadSample],
                               drained: frozenset[str] = frozenset()) -> dict[str, EndpointRoom]:
        """Flow control's view of each serving endpoint (neither drained nor failing its scrapes)."""
        try:
            self._check_state()
            async with asyncio.timeout(self._settings.state.redis_timeout_ms / 1000):
                others: SharedView | None = await self._state.lookup(pool.name, [], self._me)
        except _STATE_ERRORS as exc:
            self._state_failed("lookup", exc)
            others = None
        own = split_figures(self.own.figures(pool.name))[0]
        inflight = dict(Counter(others.inflight) + Counter(own)) if others is not None else own
        now_ms, unknown = self._clock.now_ms(), self._settings.flow.unknown_endpoint_room
        healthy = self._settings.scheduling.max_scrape_failures
        out = {}
        for e in pool.endpoints:
            if e.key in drained or (samples[e.key].consecutive_failures if e.key in samples else 0) >= healthy:
                continue
            load, n = self._fresh(samples.get(e.key), now_ms), inflight.get(e.key, 0)
            out[e.key] = EndpointRoom(n, None if load is None else estimated_waiting(load, n),
                                      has_room(load, n, pool.flow), free_slots(load, n, pool.flow, unknown))
        return out

    async def commit(self, plan: Plan, started: float) -> Placed | None:
        """Admit the plan: counted here at once, and in the state; None if another replica took the
        endpoint since the plan's view (nothing is counted then)."""
        pool, endpoint, model = plan.request.pool.name, plan.chosen.endpoint.key, plan.request.target_model
        self.own.add(pool, endpoint, plan.work_blocks, model)
        admitted = False
        try:
            self._check_state()
            async with asyncio.timeout(self._settings.state.redis_timeout_ms / 1000):
                admitted = await self._state.admit(pool, self._me, endpoint, self._settings.state.inflight_lease_ms,
                                                   plan.work_blocks, plan.others_seen, model,
                                                   plan.chosen.prefill_blocks_per_s)
        except _STATE_ERRORS as exc:
            # The state may have counted it or not; the next heartbeat replaces the record either way.
            self._state_failed("admit", exc)
        except BaseException:
            self.own.remove(pool, endpoint, plan.work_blocks, model)  # cancelled: the request is gone
            raise
        else:
            if not admitted:
                self.own.remove(pool, endpoint, plan.work_blocks, model)
                return None
        return Placed(plan.request, plan.decision.endpoints, plan.work_blocks, admitted,
                      time.perf_counter() - started, plan.decision.seconds)

    def release(self, placed: Placed) -> None:
        """The request ended: its own count goes at once, the state's in a task that always completes."""
        self.own.remove(placed.pool, placed.chosen.endpoint.key, placed.work_blocks, placed.request.target_model)
        if placed.admitted_shared:
            self._write_later(placed.pool, ReleaseWrite(self._me, placed.chosen.endpoint.key, placed.work_blocks,
                                                        placed.request.target_model))
        if self.on_release is not None:
            self.on_release(placed.pool)

    def saturated(self, pool: Pool, samples: dict[str, LoadSample]) -> bool:
        """No endpoint of the pool has room by this replica's own figures (no state round trip): the
        Sheddable filter's rule, for a copy that is dropped rather than queued."""
        own, now_ms = split_figures(self.own.figures(pool.name))[0], self._clock.now_ms()
        return not any(has_room(self._fresh(samples.get(e.key), now_ms), own.get(e.key, 0), pool.flow)
                       for e in pool.endpoints)

    def _fresh(self, sample: LoadSample | None, now_ms: int) -> LoadSample | None:
        """The sample if it is good and young enough to score by; None: the load is unknown."""
        if sample is None or not sample.ok or now_ms - sample.scraped_at_ms > self._settings.state.max_sample_age_ms:
            return None
        return sample

    def _candidates(self, pool: Pool, samples: dict[str, LoadSample], view: SharedView,
                    drained: frozenset[str], model: str) -> list[Candidate]:
        now_ms = self._clock.now_ms()
        p = self._settings.prefix
        speeds = prefill_speeds(pool, samples, p.block_chars / p.chars_per_token,
                                self._settings.scheduling.prefill_tokens_per_s_prior)
        out = []
        for e in pool.endpoints:
            sample = samples.get(e.key)
            load, inflight = self._fresh(sample, now_ms), view.inflight.get(e.key, 0)
            out.append(Candidate(e, load, sample.consecutive_failures if sample else 0,
                                 inflight, view.matched_blocks.get(e.key, 0),
                                 pending_prefill(view, e.key, speeds[e.key]), e.key in drained,
                                 view.inflight_models.get(model_field(e.key, model), 0),
                                 has_room(load, inflight, pool.flow), speeds[e.key]))
        return out

    def capacity_blocks(self, load: LoadSample | None) -> int:
        """How many prefix blocks an endpoint with this load sample can hold (its LRU's size)."""
        p = self._settings.prefix
        return capacity_blocks(load.block_size if load else 0, load.num_blocks if load else 0,
                               p.chars_per_token, p.block_chars, p.default_capacity_blocks)

    def now_ms(self) -> int:
        """Now on the fleet's clock (Redis's), as load samples are stamped."""
        return self._clock.now_ms()

    def _write_later(self, pool: str, write: Write) -> None:
        """After a decision, off its path: the prompt's blocks to index, or the request's release. One task
        per pool sends the writes gathered meanwhile in one round trip each, so under load many decisions
        share a call (and at rest each write goes at once)."""
        self._pending.setdefault(pool, []).append(write)
        if pool not in self._writing:
            self._writing.add(pool)
            self._later(self._write_pending(pool))

    async def _write_pending(self, pool: str) -> None:
        try:
            while pending := self._pending.pop(pool, None):
                for batch in write_batches(pending):
                    await self._write(pool, batch)
        finally:
            self._writing.discard(pool)

    async def _write(self, pool: str, writes: list[Write]) -> None:
        indexed = [w for w in writes if isinstance(w, IndexWrite)]
        if self._fallback is not None and indexed:
            await self._fallback.write(pool, indexed)
        try:
            self._check_state()
            # Off the request path, so a slower state may take longer; the heartbeat heals a lost release.
            async with asyncio.timeout(self._settings.state.redis_timeout_ms * 10 / 1000):
                await self._state.write(pool, writes)
        except _STATE_ERRORS as exc:
            self._state_failed("write", exc)

    def _check_state(self) -> None:
        if time.monotonic() < self._state_down_until:
            raise TimeoutError("the state failed a moment ago; leaving it alone")

    def _state_failed(self, op: str, exc: BaseException) -> None:
        """A state call failed or missed its deadline: this replica's own figures stand in (and the
        next heartbeat replaces its record), and the request path leaves the state alone a moment."""
        self._metrics.redis_fallbacks.labels(op).inc()
        now = time.monotonic()
        if now >= self._state_down_until:
            self._state_down_until = now + self._settings.state.redis_backoff_ms / 1000
            log.debug("state %s failed, placing from this replica's own figures for %d ms: %s", op,
                      self._settings.state.redis_backoff_ms, exc)

    async def publish(self, pools: list[str]) -> None:
        """The heartbeat: this replica's own figures replace its record in every pool, and renew its lease."""
        lease = self._settings.state.inflight_lease_ms
        for pool in sorted({*pools, *self.own.pools()}):
            try:
                async with asyncio.timeout(self._settings.state.redis_timeout_ms * 10 / 1000):
                    await self._state.publish(pool, self._me, lease, self.own.figures(pool))
            except _STATE_ERRORS as exc:
                log.debug("heartbeat failed: %s", exc)
                return

    def _later(self, work: Coroutine[None, None, None]) -> None:
        # Off the request's path; kept referenced so it runs to the end, and drained on shutdown.
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for the writes still under way after their requests (shutdown)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


def prefill_speeds(pool: Pool, samples: Mapping[str, LoadSample], tokens_per_block: float,
                   prior_tokens_per_s: float) -> dict[str, float]:
    """Per endpoint, the uncached prompt blocks per second it computes, as its collector measured them
    (LoadSample.prefill_tokens_per_s). One not measured yet takes the slowest measured speed of its pool,
    whose servers are alike, or the prior while none is measured (0: unknown)."""
    measured = {e.key: samples[e.key].prefill_tokens_per_s / tokens_per_block for e in pool.endpoints
                if e.key in samples and samples[e.key].prefill_tokens_per_s > 0}
    slowest = min(measured.values(), default=prior_tokens_per_s / tokens_per_block)
    return {e.key: measured.get(e.key, slowest) for e in pool.endpoints}


def pending_prefill(view: SharedView, endpoint: str, blocks_per_s: float) -> float:
    """The uncached prompt blocks `endpoint` has still to compute: those of the requests in flight there,
    less what it computed since they came at its speed (the backlog ADMIT recorded, drained since). At an
    unknown speed, or with no backlog recorded, all of the requests' blocks in flight. A request's blocks
    stay in flight until it ends, long after its prefill, so the in-flight figure alone overstates."""
    work = float(view.inflight_work.get(endpoint, 0))
    recorded = view.prefill_backlog.get(endpoint)
    left = prefill_left(recorded[0], recorded[1], blocks_per_s) if recorded else None
    return work if left is None else min(work, left)


def write_batches(writes: list[Write]) -> list[list[Write]]:
    """The writes in order, cut into calls of at most MAX_WRITE_BATCH blocks-or-releases (one write at least)."""
    out: list[list[Write]] = [[]]
    size = 0
    for w in writes:
        cost = len(w.block_hashes) if isinstance(w, IndexWrite) else 1
        if out[-1] and size + cost > MAX_WRITE_BATCH:
            out.append([])
            size = 0
        out[-1].append(w)
        size += cost
    return out
