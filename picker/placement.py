"""Placing a request: view the state, schedule, admit; later index its prompt and release it.

`plan` reads the state and schedules, with no side effect; `commit` admits the
plan; `place` does both, once more if another replica took the endpoint in
between. This replica's own in-flight figures (`OwnRequests`) are the truth:
they change at once and synchronously, so a cancelled request never leaves a
count behind, and every heartbeat publishes them whole to the state. A state
call that fails or misses its deadline falls back to those figures, the other
replicas' as the pool's last answered lookup read them (up to `recent_view_ms`
old), and the replica's own prefix index; nothing fails because Redis is slow or
gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

from gateway_state.clock import FleetClock
from gateway_state.keys import index_bucket
from gateway_state.placement_store import (
    NEVER_REFUSED,
    IndexWrite,
    Option,
    ReleaseWrite,
    SharedView,
    SpeculativeWrite,
    Weighing,
    model_figures,
    split_figures,
    summed,
)
from gateway_state.records import LoadSample, Pool
from picker.candidates import build_candidates, fresh, prefill_speeds
from picker.errors import GatewayError, Shed
from picker.intake import PlacementRequest
from picker.metrics import PickerMetrics
from picker.plugins.framework import Candidate
from picker.prefix import capacity_blocks
from picker.roles import Role, RoleRequest
from picker.saturation import estimated_waiting, free_slots, has_room
from picker.scheduler import Decision, Scheduler, Trace, load_slopes
from picker.settings import PickerSettings
from picker.state import RECENT_ADMISSIONS, MemoryState, OwnRequests, PlacementState
from picker.state_guard import STATE_ERRORS, StateGuard
from picker.writes import WriteBatcher

log = logging.getLogger("picker")
# How many times the request path's deadline a late admission's correction may take: off the path, it only
# has to land before the heartbeat would have set the record right anyway.
LATE_SLACK = 10.0
# How many of the best endpoints a decision made again after a refusal offers its admission (a pool's every
# endpoint, in pools up to this size): an admission's cost grows with its options.
RETRY_OPTIONS = 16
# How many times shutdown sends what gathered and waits for it: a late admission's settling gathers a release,
# and nothing it waits for gathers more.
DRAIN_ROUNDS = 3


@dataclass(frozen=True)
class Plan:
    request: PlacementRequest
    decision: Decision
    options: list[Option]  # the decision's endpoints as the admission may take them, the chosen first
    weighing: Weighing  # how the admission re-weighs them on the figures of that instant
    saturated: bool = False  # no candidate had room in the view (flow control queues the request)

    @property
    def chosen(self) -> Candidate:
        return self.decision.endpoints[0]

    @property
    def work_blocks(self) -> int:
        """The prompt's blocks the chosen endpoint must compute."""
        return self.options[0].work_blocks


@dataclass(frozen=True)
class AnsweredLookup:
    """The other replicas' figures as the pool's last answered lookup read them."""

    view: SharedView
    mark: int  # this replica's admissions up to here were in them (OwnRequests.mark)
    at: float  # monotonic s


@dataclass(frozen=True)
class EndpointRoom:
    inflight: int  # the fleet's requests there now
    estimated_waiting: float | None  # its queue now (saturation.estimated_waiting); None: no fresh sample
    has_room: bool  # below the saturation thresholds: a request arriving while none waits goes there
    free_slots: int  # waiting requests the release rule lets through to it now


@dataclass
class LateAdmission:
    """An admission whose answer missed its deadline: the request went to the decision's choice, and the state,
    which may have counted it there, at another of the options or nowhere, is set right when the answer comes."""

    shared: bool = False  # the state now counts it at the endpoint it went to, so the state releases it
    ended: bool = False  # the request ended (or never went) before that


@dataclass(frozen=True)
class Placed:
    request: PlacementRequest
    endpoints: list[Candidate]  # chosen first, then fallbacks
    work_blocks: int
    admitted_shared: bool  # the state counted it, so the state releases it
    decision_seconds: float  # body parsed to admission, state round trips included
    schedule_seconds: float  # the scheduling runner alone
    late: LateAdmission | None = None  # the admission's answer came past its deadline, or never

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
                 settings: PickerSettings, metrics: PickerMetrics, clock: FleetClock, guard: StateGuard,
                 writes: WriteBatcher) -> None:
        self._state = state
        self._fallback = fallback_index  # None when the state is this replica's memory already
        self._scheduler = scheduler
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._guard = guard
        # An admission's deadline in request-path deadlines (the guard's unit).
        self._admission_slack = settings.state.admission_timeout_ms / settings.state.redis_timeout_ms
        self._writes = writes
        self._me = settings.server.replica_id
        self.own = OwnRequests()
        self._answered: dict[str, AnsweredLookup] = {}  # pool -> its last answered lookup
        self._replaced_at: dict[str, float] = {}  # pool -> when the heartbeat last replaced this replica's record
        # pool -> (its record and samples, their prefill speeds): worked out once per snapshot, not per decision
        self._speeds: dict[str, tuple[Pool, Mapping[str, LoadSample], dict[str, float]]] = {}

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
            self._metrics.of(self._metrics.placement_conflicts, request.pool.name).inc()
        assert placed is not None  # an unchecked commit always admits
        return placed

    def _index_write(self, request: PlacementRequest, chosen: Candidate) -> IndexWrite | SpeculativeWrite:
        """What the index notes of a placement: in the approximate index, that the endpoint holds the prompt;
        in an index built from engine events, that it will hold the blocks it does not yet, until its
        engine says so (an endpoint whose stream is not live keeps them for the approximate lifetime)."""
        key, prefix = chosen.endpoint.key, self._settings.prefix
        if not request.speculative:
            return IndexWrite(key, request.block_hashes, prefix.ttl_ms, self.capacity_blocks(chosen.load),
                              chosen.matched_blocks)
        bucket = index_bucket(request.block_hashes[0])
        if key in request.live_streams:
            return SpeculativeWrite(key, request.block_hashes[chosen.matched_blocks:], prefix.speculative_ttl_ms,
                                    bucket)
        return SpeculativeWrite(key, request.block_hashes, prefix.ttl_ms, bucket)

    async def plan(self, request: PlacementRequest, samples: dict[str, LoadSample], check: bool = True,
                   drained: frozenset[str] = frozenset(), trace: Trace | None = None,
                   profile: str | None = None, released: bool = False) -> Plan:
        """The decision the state supports now; reads only (so it also explains decisions)."""
        pool = request.pool
        others, mark = await self._lookup(pool.name, request.block_hashes, request.speculative)
        # Read after the await: decisions this replica made meanwhile must count.
        own = self.own.figures(pool.name)
        (own_requests, own_work), own_models = split_figures(own), model_figures(own)
        if others is None:
            matched = self._fallback.matched(pool.name, request.block_hashes) if self._fallback else {}
            view = SharedView(own_requests, matched, own_work, inflight_models=own_models)
        else:
            view = SharedView(summed(others.inflight, own_requests), others.matched_blocks,
                              summed(others.inflight_work, own_work), summed(others.inflight_models, own_models),
                              others.prefill_backlog, self.own.work_since(pool.name, mark))
        candidates = build_candidates(pool, samples, self._prefill_speeds(pool, samples), view, drained,
                                      request.scheduling.model, self._clock.now_ms(), self._settings)
        if released:
            # Where it can start now: an endpoint with free slots that is not drained (a drained one keeps
            # its slots free, and alone among the candidates it would leave the drain filter nothing).
            unknown = self._settings.flow.unknown_endpoint_room
            candidates = [c for c in candidates if not c.draining
                          and free_slots(c.load, c.inflight, pool.flow, unknown) > 0] or candidates
        # Unchecked (decided again after a refusal), the admission weighs every candidate (up to RETRY_OPTIONS):
        # this view too is tens of ms old when admitted in a burst, and the best of three may be a pod that
        # others filled meanwhile.
        decision = self._scheduler.schedule(profile or pool.strategy, request.scheduling, candidates, trace,
                                            at_least=0 if check else RETRY_OPTIONS)
        # What the decision saw in all, its own replica's requests included: an admission of this replica's
        # that switched endpoints after the view was read weighs on the re-weighing as another replica's would.
        options = [Option(c.endpoint.key, max(0, request.scheduling.work_blocks - c.matched_blocks),
                          -1 if others is None else view.inflight.get(c.endpoint.key, 0),
                          0 if others is None else view.inflight_work.get(c.endpoint.key, 0), score,
                          c.prefill_blocks_per_s) for c, score in zip(decision.endpoints, decision.scores, strict=True)]
        per_request, per_block = load_slopes(self._settings.scheduling, candidates)
        # Checked, the admission is refused when every option fell below the best candidate left out of them;
        # unchecked (the second round), it takes the best of them whatever happened.
        weighing = Weighing(per_request, per_block, self._settings.scheduling.tie_margin,
                            max(decision.beyond, NEVER_REFUSED) if check else NEVER_REFUSED)
        return Plan(request, decision, options, weighing, not any(c.room for c in candidates if not c.draining))

    def _prefill_speeds(self, pool: Pool, samples: Mapping[str, LoadSample]) -> dict[str, float]:
        known = self._speeds.get(pool.name)
        if known is not None and known[0] is pool and known[1] is samples:
            return known[2]
        p = self._settings.prefix
        speeds = prefill_speeds(pool, samples, p.block_chars / p.chars_per_token,
                                self._settings.scheduling.prefill_tokens_per_s_prior)
        self._speeds[pool.name] = (pool, samples, speeds)
        return speeds

    async def _lookup(self, pool: str, block_hashes: list[str], speculative: bool = False) \
            -> tuple[SharedView | None, int]:
        """The other replicas' figures and the prompt's holders, with the mark of this replica's admissions
        they hold. When the state does not answer, the last answered lookup of the pool stands in, up to
        `recent_view_ms` old (its ages moved on, the holders from this replica's own index); older, None."""
        mark = self.own.mark()
        # The releases gathered ride along, but not into a call the guard would skip (they would be lost).
        releases = self._writes.take_releases(pool) if self._guard.usable else []
        others = await self._guard.call("lookup", self._state.lookup(pool, block_hashes, self._me, speculative,
                                                                     releases))
        now = time.monotonic()
        if others is not None:
            self._answered[pool] = AnsweredLookup(others, mark, now)
            return others, mark
        last = self._answered.get(pool)
        if last is None or (now - last.at) * 1000 > self._settings.state.recent_view_ms \
                or self.own.mark() - last.mark > RECENT_ADMISSIONS:  # own work since then no longer known
            return None, mark
        aged = int((now - last.at) * 1000)
        matched = self._fallback.matched(pool, block_hashes) if self._fallback else {}
        return replace(last.view, matched_blocks=matched, prefill_backlog={
            e: (blocks, age + aged) for e, (blocks, age) in last.view.prefill_backlog.items()}), last.mark

    async def room(self, pool: Pool, samples: dict[str, LoadSample], drained: frozenset[str] = frozenset()) -> int:
        """How many waiting requests the pool can take now by flow control's release rule (saturation.free_slots),
        over every replica's in-flight requests (as `_lookup` has them while the state cannot answer)."""
        return sum(r.free_slots for r in (await self.room_by_endpoint(pool, samples, drained)).values())

    async def room_by_endpoint(self, pool: Pool, samples: dict[str, LoadSample],
                               drained: frozenset[str] = frozenset()) -> dict[str, EndpointRoom]:
        """Flow control's view of each serving endpoint (neither drained nor failing its scrapes)."""
        others, _ = await self._lookup(pool.name, [])
        own = split_figures(self.own.figures(pool.name))[0]
        inflight = summed(others.inflight, own) if others is not None else own
        now_ms, unknown = self._clock.now_ms(), self._settings.flow.unknown_endpoint_room
        healthy = self._settings.scheduling.max_scrape_failures
        out = {}
        for e in pool.endpoints:
            if e.key in drained or (samples[e.key].consecutive_failures if e.key in samples else 0) >= healthy:
                continue
            load, n = fresh(samples.get(e.key), now_ms, self._settings.state.max_sample_age_ms), inflight.get(e.key, 0)
            out[e.key] = EndpointRoom(n, None if load is None else estimated_waiting(load, n),
                                      has_room(load, n, pool.flow), free_slots(load, n, pool.flow, unknown))
        return out

    async def commit(self, plan: Plan, started: float) -> Placed | None:
        """Admit the plan: counted here at once, and in the state; None if the state refused it (another replica
        took its endpoints since the plan's view: nothing is counted then). The state may admit it at another of
        the decision's endpoints instead, re-weighed on the figures there now. The admission carries the writes
        gathered for the pool (releases) and, if the chosen endpoint is admitted, the prompt's blocks to index (in a
        burst these wait for the pool's admissions under way, and only releases ride: writes.py)."""
        request = plan.request
        pool, model = request.pool.name, request.target_model
        endpoints = plan.decision.endpoints
        own = [self._index_write(request, plan.chosen)] if request.block_hashes else []
        # Where the index is on other shards than the pool's, the write goes after the admission, off its path;
        # so it does in a burst (the pool's admissions under way go first: writes.WriteBatcher).
        burst = self._writes.admitting(pool) > 0
        carried = own if self._state.index_rides_admission and not burst else []
        admission = self.own.add(pool, plan.chosen.endpoint.key, plan.work_blocks, model)
        sent = None
        try:
            if self._guard.usable:
                # Sent, the admission runs to its answer even past the deadline, so the state can be set right
                # then. On one Redis the call is already a future of its reply; a cluster's coroutine becomes a task.
                sent = self._writes.under_way(pool, self._state.admit(
                    pool, self._me, plan.options, self._settings.state.inflight_lease_ms, model, plan.weighing,
                    self._writes.take_releases(pool) if burst else self._writes.take(pool), carried))
                admitted = await self._guard.call("admit", asyncio.shield(sent), slack=self._admission_slack)
            else:
                self._guard.skip("admit")
                admitted = None
        except BaseException:
            self.own.remove(pool, plan.chosen.endpoint.key, plan.work_blocks, model, admission)  # cancelled
            if sent is not None:
                self._guard.later(self._settle(plan, sent, LateAdmission(ended=True)))
            raise
        late = None
        if admitted is None and sent is not None and not sent.done():  # not answered yet (not a failed call)
            late = LateAdmission()
            self._guard.later(self._settle(plan, sent, late))
        if admitted == 0:
            self.own.remove(pool, plan.chosen.endpoint.key, plan.work_blocks, model, admission)
            return None
        work_blocks = plan.work_blocks
        if admitted is not None and admitted > 1:  # another of the decision's endpoints, re-weighed
            self.own.remove(pool, plan.chosen.endpoint.key, plan.work_blocks, model, admission)
            switched = plan.options[admitted - 1]
            self.own.add(pool, switched.endpoint, switched.work_blocks, model)
            self._metrics.of(self._metrics.placement_switches, pool).inc()
            endpoints = [endpoints[admitted - 1], *(c for i, c in enumerate(endpoints) if i != admitted - 1)]
            work_blocks = switched.work_blocks
            own = [self._index_write(request, endpoints[0])] if request.block_hashes else []
            carried = []
        if own and (admitted is None or not carried):
            # The request goes to the endpoint either way, so the index must say so: after the admission, or
            # on its own when the admission's answer was lost (it may have carried it: written twice is the
            # same). The batcher notes it in the fallback index too.
            for w in own:
                self._writes.add(pool, w)
        elif own and self._fallback is not None:
            await self._fallback.write(pool, own)
        endpoints = endpoints[:self._settings.scheduling.fallbacks + 1]  # the answer's fallbacks, as decided
        return Placed(plan.request, endpoints, work_blocks, bool(admitted), time.perf_counter() - started,
                      plan.decision.seconds, late)

    async def _settle(self, plan: Plan, sent: asyncio.Future[int], late: LateAdmission) -> None:
        """The late answer of an admission: where the state counted the request (the re-weighing may have taken
        another option, or none) is moved to where it went, or released if it already ended. Until then, and
        when the answer never comes, this replica's own figures count it right and the next heartbeat publishes
        them whole."""
        pool, model = plan.request.pool.name, plan.request.target_model
        try:
            admitted = await sent
        except STATE_ERRORS:
            self._metrics.of(self._metrics.late_admissions, pool, "lost").inc()
            return
        self._guard.answered()
        counted = plan.options[admitted - 1] if admitted else None
        went = plan.options[0]
        if counted is not None and counted.endpoint == went.endpoint and not late.ended:
            late.shared = True
            self._metrics.of(self._metrics.late_admissions, pool, "as_sent").inc()
            return
        taken_back = [ReleaseWrite(self._me, counted.endpoint, counted.work_blocks, model)] if counted else []
        if late.ended:
            for w in taken_back:
                self._writes.add(pool, w)
            self._metrics.of(self._metrics.late_admissions, pool, "ended").inc()
            return
        self._metrics.of(self._metrics.late_admissions, pool, "moved" if counted else "added").inc()
        # One call: the count taken back from where the state put it, then counted where the request went.
        moved = await self._guard.call("settle", self._writes.under_way(pool, self._state.admit(
            pool, self._me, [Option(went.endpoint, went.work_blocks, blocks_per_s=went.blocks_per_s)],
            self._settings.state.inflight_lease_ms, model, Weighing(floor=NEVER_REFUSED), taken_back)),
            slack=LATE_SLACK, in_backoff=True)
        if moved and late.ended:  # it ended while the move was under way
            self._writes.add(pool, ReleaseWrite(self._me, went.endpoint, went.work_blocks, model))
        late.shared = bool(moved) and not late.ended

    def release(self, placed: Placed) -> None:
        """The request ended: its own count goes at once, the state's in a task that always completes."""
        self.own.remove(placed.pool, placed.chosen.endpoint.key, placed.work_blocks, placed.request.target_model)
        late = placed.late
        if late is not None and not late.shared:
            late.ended = True  # its late answer takes back what the state counted
        elif placed.admitted_shared or late is not None:  # admitted in time, or its late answer made it shared
            self._writes.add(placed.pool, ReleaseWrite(self._me, placed.chosen.endpoint.key, placed.work_blocks,
                                                       placed.request.target_model))

    def saturated(self, pool: Pool, samples: dict[str, LoadSample]) -> bool:
        """No endpoint of the pool has room by this replica's own figures (no state round trip): the
        Sheddable filter's rule, for a copy that is dropped rather than queued."""
        own, now_ms = split_figures(self.own.figures(pool.name))[0], self._clock.now_ms()
        max_age = self._settings.state.max_sample_age_ms
        return not any(has_room(fresh(samples.get(e.key), now_ms, max_age), own.get(e.key, 0), pool.flow)
                       for e in pool.endpoints)

    def capacity_blocks(self, load: LoadSample | None) -> int:
        """How many prefix blocks an endpoint with this load sample can hold (its LRU's size)."""
        p = self._settings.prefix
        return capacity_blocks(load.block_size if load else 0, load.num_blocks if load else 0,
                               p.chars_per_token, p.block_chars, p.default_capacity_blocks)

    def now_ms(self) -> int:
        """Now on the fleet's clock (Redis's), as load samples are stamped."""
        return self._clock.now_ms()

    async def publish(self, pools: list[str]) -> None:
        """The heartbeat: this replica's own figures replace its record in every pool, and renew its lease.

        Its figures count a request from the moment its admission is sent, at the endpoint it was sent for,
        and the admission may count it at another endpoint or refuse it. So while one of the pool's
        admissions is under way the record is kept and only the lease renewed: replaced then, the record
        would count that request twice, or at an endpoint it never went to, until the next heartbeat, and
        every admission meanwhile would re-weigh that endpoint as busier than it is. A record kept this way
        longer than half a lease (the replica is never without an admission under way) is replaced anyway:
        healing what a lost call left behind wins then.
        The releases still gathered are dropped from the writes when the record is replaced: the figures
        leave those requests out already, and applied after, the releases would take them off again. On one
        Redis the call goes out behind every call sent before it, on the same connection (the script link).
        """
        lease = self._settings.state.inflight_lease_ms
        for pool in sorted({*pools, *self.own.pools()}):
            now = time.monotonic()
            figures: dict[str, int] | None = None
            if self._writes.admitting(pool) <= 0 or now - self._replaced_at.setdefault(pool, now) > lease / 2000:
                self._writes.drop_releases(pool)
                figures = self.own.figures(pool)
                self._replaced_at[pool] = now
            try:
                async with asyncio.timeout(self._settings.state.redis_timeout_ms * 10 / 1000):
                    await self._state.publish(pool, self._me, lease, figures)
            except STATE_ERRORS as exc:  # no back-off here: the heartbeat keeps probing
                log.debug("heartbeat failed: %s", exc)
                return

    async def drain(self) -> None:
        """Send the writes still gathered, and wait for those under way (shutdown). Work under way may gather
        writes of its own meanwhile (a late admission's answer, settled, releases the request it counted):
        those go too, in a few rounds at most."""
        for _ in range(DRAIN_ROUNDS):
            self._writes.flush()
            await self._guard.drain()
            if not self._writes.gathered():
                return
