"""The director: one request's sequence, in order, and its end.

  1. intake: the body read against the configuration (model, rewrite, prompt blocks, priority);
  2. roles: the placements the request needs, each with its scheduling profile (roles.py);
  3. flow control's gate: placed at once while the pool has room and nobody waits, else in its turn;
  4. placement of every role: view, schedule, admit (placement.py);
  5. the answer's plan: the destination and its fallbacks, the copies' headers, the body to send on,
     and the decision's metrics and log line;
and when the exchange ends, `finish`: each placement released, and flow control told room may have freed.

The ext_proc edge (extproc.py) only speaks the protocol around it, and `/admin/explain` runs steps 1
to 4 without admitting anything (`explain`), so the explanation follows the same sequence as the
decision: the gateway's subset hint, the route's mirror, the objective and the tenant included.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from gateway_state.lifecycle import LineLog
from gateway_state.protocol import (
    DESTINATION_HEADER,
    MIRROR_CLUSTER_HEADER,
    MIRROR_ENDPOINT_HEADER,
    PREFILL_ENDPOINT_HEADER,
    pool_cluster,
)
from picker.errors import Shed
from picker.flow_control import FlowController
from picker.hit_counts import HitCounts
from picker.intake import Intake, PlacementRequest
from picker.metrics import PickerMetrics
from picker.placement import Placement, Placements, Plan, Saturated
from picker.roles import Mirror, ProfileHandler, Role, RoleRequest
from picker.scheduler import Trace
from picker.snapshot import SnapshotSource

record = LineLog("picker")  # the line per decision, in the format of every other log line
# The model label of requests for a model the pool does not list: clients choose those names.
UNLISTED = "(unlisted)"


@dataclass(frozen=True)
class Arrival:
    """One request as the gateway hands it over."""

    pool: str | None  # the route's pool (None: a gateway that names none; the picker's default then)
    path: str
    body: bytes
    subset: frozenset[str] | None = None  # the gateway's candidate endpoints, when it narrows them
    mirror: Mirror | None = None  # the route's InferencePool mirror
    objective: str | None = None  # the InferenceObjective the request names
    tenant: str = ""  # its fairness id
    request_id: str = ""


@dataclass(frozen=True)
class Answer:
    """A placed request, and what the gateway is told to do with it."""

    request: PlacementRequest
    placements: Placements
    headers: list[tuple[str, str]]  # to set on the request: the destination, and the copies'
    body: bytes | None  # the body to send on instead of the client's (a rewritten model, SGLang's bootstrap)

    @property
    def destinations(self) -> str:
        """The ordered endpoint list of the upstream protocol's `envoy.lb` metadata: chosen first."""
        return ",".join(c.endpoint.key for c in self.placements.primary.endpoints)


@dataclass(frozen=True)
class Explained:
    """What the sequence would do now with a request, admitting nothing."""

    request: PlacementRequest
    plans: list[tuple[RoleRequest, Plan, Trace]]
    flow: str  # "placed", "queued" (the pool is saturated or others wait) or "shed" (negative priority)
    dropped: list[Role]  # optional roles (a mirror) dropped because their pool is saturated


class Director:
    def __init__(self, snapshots: SnapshotSource, intake: Intake, roles: ProfileHandler, flow: FlowController,
                 placement: Placement, metrics: PickerMetrics, hits: HitCounts) -> None:
        self._snapshots = snapshots
        self._intake = intake
        self._roles = roles
        self._flow = flow
        self._placement = placement
        self._metrics = metrics
        self._hits = hits

    async def decide(self, arrival: Arrival) -> Answer:
        """Steps 1 to 5; a GatewayError is the client's answer (the edge shapes it)."""
        snapshot = self._snapshots.current
        request = self.read(arrival)
        roles = self._roles.roles(request, snapshot.config, arrival.mirror)
        try:
            placements = await self._place(roles)
        except BaseException:
            self._flow.released(request.pool.name)  # a failed placement released what it had admitted
            raise
        return self.answer(arrival, request, placements)

    def finish(self, answer: Answer) -> None:
        """The exchange ended: every role with the client's (the copies' own ends are not visible)."""
        for placed in answer.placements.placed.values():
            self._placement.release(placed)
        for pool in {p.pool for p in answer.placements.placed.values()}:
            self._flow.released(pool)

    async def explain(self, arrival: Arrival) -> Explained:
        """Steps 1 to 4 on this replica's snapshot, scheduling each role but admitting nothing."""
        snapshot = self._snapshots.current
        request = self.read(arrival)
        plans, dropped = [], []
        for role in self._roles.roles(request, snapshot.config, arrival.mirror):
            pool = role.request.pool
            if role.optional and self._placement.saturated(pool, snapshot.load.get(pool.name, {})):
                dropped.append(role.role)
                continue
            trace = Trace()
            plan = await self._placement.plan(role.request, snapshot.load.get(pool.name, {}), False,
                                              snapshot.drained.get(pool.name, frozenset()), trace, role.profile)
            plans.append((role, plan, trace))
        flow = "placed"
        if self._flow.enabled and (plans[0][1].saturated or self._flow.someone_waits(request.pool.name)):
            flow = "shed" if request.priority < 0 else "queued"
        return Explained(request, plans, flow, dropped)

    def read(self, arrival: Arrival) -> PlacementRequest:
        """Step 1, the same for a decision and an explanation."""
        snapshot = self._snapshots.current
        return self._intake.read(snapshot.config, arrival.pool, arrival.path, arrival.body,
                                 arrival.subset, arrival.mirror.pool if arrival.mirror else None, arrival.objective,
                                 arrival.tenant, snapshot.kv_events)

    async def _place(self, roles: list[RoleRequest]) -> Placements:
        """Steps 3 and 4: through flow control's gate, then every role placed."""
        request = roles[0].request
        snapshot = self._snapshots.current
        if not self._flow.enabled:
            return await self._placement.place_roles(roles, snapshot.load, snapshot.drained)
        if not self._flow.someone_waits(request.pool.name):
            try:
                return await self._placement.place_roles(roles, snapshot.load, snapshot.drained, gate=True)
            except Saturated:
                pass
            except Shed:
                self._flow.shed(request)
                raise
        async with self._flow.turn(request):
            snapshot = self._snapshots.current
            return await self._placement.place_roles(roles, snapshot.load, snapshot.drained, released=True)

    def answer(self, arrival: Arrival, request: PlacementRequest, placements: Placements) -> Answer:
        """Step 5: what the gateway is told, and the decision's metrics and log line."""
        placed, holder = placements.primary, placements.prefix_holder
        chosen = placed.chosen.endpoint
        model, target = (request.model, request.target_model) if request.listed else (UNLISTED, UNLISTED)
        self._metrics.of(self._metrics.requests, model, placed.pool, chosen.name, "routed").inc()
        self._metrics.of(self._metrics.objective_requests, model, target).inc()
        self._metrics.of(self._metrics.decision_seconds, placed.pool, request.pool.strategy.value).observe(
            max(p.decision_seconds for p in placements.placed.values()))
        prompt_blocks, matched = len(holder.request.block_hashes), holder.chosen.matched_blocks
        if prompt_blocks:
            self._metrics.of(self._metrics.prefix_blocks_queried, holder.pool).inc(prompt_blocks)
            self._metrics.of(self._metrics.prefix_blocks_matched, holder.pool).inc(matched)
            self._hits.add(holder.pool, model, prompt_blocks, matched)
        headers = [(DESTINATION_HEADER, chosen.key)]
        body = request.body
        copies = []
        mirror = placements.placed.get(Role.MIRROR)
        if mirror is not None:
            self._metrics.of(self._metrics.mirrors, mirror.pool, "mirrored").inc()
            headers += [(MIRROR_CLUSTER_HEADER, pool_cluster(mirror.pool, "mirror")),
                        (MIRROR_ENDPOINT_HEADER, mirror.chosen.endpoint.key)]
            copies.append(f"mirror={mirror.chosen.endpoint.key}")
        for role, reason in placements.dropped:
            self._metrics.of(self._metrics.mirrors, role.request.pool.name, "dropped").inc()
            copies.append(f"mirror=dropped({reason.status})")
        prefill = placements.placed.get(Role.PREFILL)
        if prefill is not None and request.pool.pd is not None:
            headers.append((PREFILL_ENDPOINT_HEADER, prefill.chosen.endpoint.key))
            body = with_bootstrap(body if body is not None else arrival.body, prefill.chosen.endpoint.address,
                                  request.pool.pd.bootstrap_port, secrets.randbits(63))
            copies.append(f"prefill={prefill.chosen.endpoint.key}")
        record.info("Request Handled request_id=%s model=%s target_model=%s pool=%s pod=%s endpoint=%s strategy=%s "
                    "prefix_blocks=%d/%d fallbacks=%s copies=%s decision_ms=%.3f schedule_ms=%.3f",
                    arrival.request_id or "-", request.model, request.target_model, placed.pool, chosen.name,
                    chosen.key, request.pool.strategy.value, matched, prompt_blocks,
                    ",".join(c.endpoint.key for c in placed.endpoints[1:]) or "-", ",".join(copies) or "-",
                    placed.decision_seconds * 1000, placed.schedule_seconds * 1000)
        return Answer(request, placements, headers, body)


def with_bootstrap(body: bytes, host: str, port: int, room: int) -> bytes:
    """The JSON object with SGLang's bootstrap fields added (they win over any the client sent: the
    last duplicate key counts). The body was parsed as an object, so it ends with its closing brace."""
    end = body.rstrip().rfind(b"}")
    fields = json.dumps({"bootstrap_host": host, "bootstrap_port": port, "bootstrap_room": room})[1:-1]
    separator = b"," if body[:end].strip() != b"{" else b""
    return body[:end] + separator + fields.encode() + b"}"
