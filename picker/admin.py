"""The admin API: what the fleet knows, why a request would go where, and drains.

Served by every picker replica on its own port (FastAPI on uvicorn), so
`POST /admin/explain` runs the director's own sequence (intake, roles, flow
control's verdict, each role's schedule) on this replica's snapshot, admitting
nothing: the explanation cannot drift from the decisions. It reads the shared
state and writes only drains. Every route but the status page's HTML needs a
bearer token (read, or admin for drains), and no response holds prompt text:
prompts appear as the counts of their blocks, as in Redis.

No `from __future__ import annotations` here: FastAPI reads the route
signatures' annotations, and they name dependencies local to the app factory.
"""

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway_state.protocol import FAIRNESS_HEADERS, OBJECTIVE_HEADERS
from gateway_state.records import BypassSample, Pool
from gateway_state.sharding import owner
from gateway_state.store import StateStore
from picker.director import Arrival, Director
from picker.errors import GatewayError
from picker.flow_control import FlowController
from picker.intake import PlacementRequest
from picker.placement import Placement, Plan
from picker.plugins.framework import SchedulingRequest
from picker.roles import Mirror, RoleRequest
from picker.scheduler import Trace
from picker.snapshot import SnapshotSource

STATUS_PAGE = Path(__file__).with_name("status_page.html")
HIT_WINDOWS_MIN = (1, 5, 60)
# Collectors refresh a gateway's figures every second by default: ten seconds without one means no
# collector reads that gateway any more, and its figures no longer say anything.
BYPASS_FRESH_MS = 10_000
READ, ADMIN = "read", "admin"


class Tokens:
    """Bearer tokens and their scopes, from a YAML file (`tokens: {TOKEN: read|admin}`), re-read when it
    changes, as a mounted Kubernetes Secret does on rotation."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._mtime = -1.0
        self._scopes: dict[str, str] = {}

    def scope(self, token: str) -> str | None:
        if self._path is None:
            return None
        mtime = self._path.stat().st_mtime
        if mtime != self._mtime:
            loaded = yaml.safe_load(self._path.read_text()) or {}
            self._scopes = {str(t): str(s) for t, s in (loaded.get("tokens") or {}).items() if s in (READ, ADMIN)}
            self._mtime = mtime
        return self._scopes.get(token)


@dataclass(frozen=True)
class AdminContext:
    snapshots: SnapshotSource
    placement: Placement
    director: Director
    store: StateStore
    tokens: Tokens
    replica: str
    flow: FlowController


def _sample(load: Any, now_ms: int) -> dict[str, Any] | None:
    if load is None:
        return None
    return {"waiting": load.waiting, "running": load.running, "kv_cache_usage": load.kv_cache_usage,
            "running_adapters": list(load.running_adapters), "ok": load.ok,
            "consecutive_failures": load.consecutive_failures,
            "age_ms": max(0, now_ms - load.scraped_at_ms) if load.scraped_at_ms > 0 else None,
            "num_blocks": load.num_blocks, "block_size": load.block_size, "batch_limit": load.batch_limit or None,
            "prefill_tokens_per_s": load.prefill_tokens_per_s or None, "unreported": list(load.unreported)}


def _bypass(samples: dict[str, BypassSample], now_ms: int) -> dict[str, Any] | None:
    """Requests the gateways served without a picker's decision over their collectors' window, summed over
    the gateway instances read lately; None when no gateway's counters are read for the pool."""
    fresh = {g: s for g, s in samples.items() if now_ms - s.at_ms <= BYPASS_FRESH_MS}
    if not fresh:
        return None
    requests, bypassed = sum(s.requests for s in fresh.values()), sum(s.bypassed for s in fresh.values())
    window_s = max(s.window_ms for s in fresh.values()) / 1000
    return {"requests": requests, "bypassed": bypassed, "ratio": bypassed / requests if requests else None,
            "bypassed_per_s": bypassed / window_s if window_s else None, "window_s": window_s,
            "gateways": {g: {"requests": s.requests, "bypassed": s.bypassed, "window_s": s.window_ms / 1000,
                             "requests_total": s.requests_total, "bypassed_total": s.bypassed_total}
                         for g, s in sorted(fresh.items())}}


def _trace_json(trace: Trace) -> dict[str, Any]:
    return {
        "candidates": trace.candidates,
        "filters": [{"name": name, "removed": removed} for name, removed in trace.removed],
        "scorers": [{"name": name, "weight": weight, "raw": raw,
                     "weighted": {e: weight * min(1.0, max(0.0, s)) for e, s in raw.items()}}
                    for name, weight, raw in trace.scores],
        "totals": trace.totals, "picker": trace.picker,
    }


def build_admin_app(ctx: AdminContext) -> FastAPI:
    app = FastAPI(title="Inference picker fleet admin API", version="1",
                  description="What the fleet knows, why a request would go where, and endpoint drains.")
    bearer = HTTPBearer(auto_error=False)

    def scope_of(credentials: HTTPAuthorizationCredentials | None) -> str:
        scope = ctx.tokens.scope(credentials.credentials) if credentials is not None else None
        if scope is None:
            raise HTTPException(401, "A valid bearer token is required.", headers={"WWW-Authenticate": "Bearer"})
        return scope

    def reader(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
        return scope_of(credentials)

    def admin(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
        if scope_of(credentials) != ADMIN:
            raise HTTPException(403, "Drains need a token with the admin scope.")
        return ADMIN

    Reader = Annotated[str, Depends(reader)]  # noqa: N806 (a type alias)

    def pool_of(namespace: str, name: str) -> Pool:
        config = ctx.snapshots.current.config
        pool = config.pools.get(f"{namespace}/{name}") if config else None
        if pool is None:
            raise HTTPException(404, f"No pool {namespace}/{name}.")
        return pool

    async def endpoints_view(pool: Pool) -> list[dict[str, Any]]:
        snapshot = ctx.snapshots.current
        samples = snapshot.load.get(pool.name, {})
        drained = snapshot.drained.get(pool.name, frozenset())
        # The scores every scorer gives now, for a request with no prompt to match.
        neutral = PlacementRequest("", pool, None, [], SchedulingRequest("", 0, 0))
        trace = Trace()
        with contextlib.suppress(GatewayError):  # no candidate left (all drained, say): the trace has the rest
            await ctx.placement.plan(neutral, samples, False, drained, trace)
        scores = _trace_json(trace)["scorers"]
        fleet = await ctx.store.read_fleet([pool.name])
        by_replica = await ctx.store.inflight_by_replica(pool.name, sorted(fleet.pickers.get(pool.name, {})))
        now_ms = ctx.placement.now_ms()
        return [{
            "name": e.name, "endpoint": e.key, "labels": e.labels, "drained": e.key in drained,
            "load": _sample(samples.get(e.key), now_ms),
            "inflight": {r: figures.get(e.key, 0) for r, figures in by_replica.items() if figures.get(e.key)},
            "scores": {s["name"]: {"raw": s["raw"].get(e.key), "weighted": s["weighted"].get(e.key)}
                       for s in scores},
            "total": trace.totals.get(e.key),
        } for e in pool.endpoints]

    @app.get("/admin/pools", summary="Pools with their endpoints: load, drain, in-flight, scores now")
    async def pools(_: Reader) -> list[dict[str, Any]]:
        config = ctx.snapshots.current.config
        if config is None:
            return []
        bypass = await ctx.store.read_bypass(list(config.pools))
        now_ms = ctx.placement.now_ms()
        return [{"pool": p.name, "strategy": p.strategy.value, "runtime": p.runtime.value,
                 "failure_mode": p.failure_mode.value, "target_ports": list(p.target_ports),
                 "pd": None if p.pd is None else {"role_label": p.pd.role_label, "bootstrap_port": p.pd.bootstrap_port},
                 "bypass": _bypass(bypass.get(p.name, {}), now_ms),
                 "endpoints": await endpoints_view(p)} for p in config.pools.values()]

    @app.get("/admin/pools/{namespace}/{name}/prefix", summary="The prefix index: blocks held, hit ratios")
    async def prefix(namespace: str, name: str, _: Reader) -> dict[str, Any]:
        pool = pool_of(namespace, name)
        samples = ctx.snapshots.current.load.get(pool.name, {})
        minute = int(time.time() // 60)
        counts = await ctx.store.hit_counts(pool.name, range(minute - max(HIT_WINDOWS_MIN) + 1, minute + 1))
        windows: dict[str, dict[str, dict[str, float | int | None]]] = {}
        for window in HIT_WINDOWS_MIN:
            totals: dict[str, list[int]] = {}
            for m in range(minute - window + 1, minute + 1):
                for model, (queried, matched) in counts.get(m, {}).items():
                    t = totals.setdefault(model, [0, 0])
                    t[0], t[1] = t[0] + queried, t[1] + matched
            windows[f"{window}m"] = {model: {"queried_blocks": q, "matched_blocks": m,
                                             "hit_ratio": m / q if q else None} for model, (q, m) in totals.items()}
        if pool.kv_events is not None:  # the engines' own word: each endpoint's KV-event stream
            streams = await ctx.store.kv_statuses(pool.name)
            endpoints = [{"name": e.name, "endpoint": e.key,
                          "blocks_held": streams[e.key].blocks if e.key in streams else 0,
                          "stream": asdict(streams[e.key]) if e.key in streams else None} for e in pool.endpoints]
            return {"pool": pool.name, "prefix_index": "events", "endpoints": endpoints, "hit_ratios": windows}
        held = await ctx.store.prefix_blocks_held(pool.name, [e.key for e in pool.endpoints])
        return {"pool": pool.name, "prefix_index": "approximate", "endpoints": [
            {"name": e.name, "endpoint": e.key, "blocks_held": held.get(e.key, 0),
             "capacity_blocks": ctx.placement.capacity_blocks(samples.get(e.key))} for e in pool.endpoints],
            "hit_ratios": windows}

    @app.get("/admin/pools/{namespace}/{name}/queue",
             summary="Flow control: the pool's room now, and the requests waiting for it over the fleet")
    async def queue(namespace: str, name: str, _: Reader) -> dict[str, Any]:
        pool = pool_of(namespace, name)
        snapshot = ctx.snapshots.current
        endpoints = await ctx.placement.room_by_endpoint(pool, snapshot.load.get(pool.name, {}),
                                                         snapshot.drained.get(pool.name, frozenset()))
        waiting, grants = await ctx.store.queue_view(pool.name)
        now_ms = ctx.placement.now_ms()
        priorities: dict[int, dict[str, Any]] = {}
        for owner_replica, priority, _deadline, enqueued, tenant in waiting:
            p = priorities.setdefault(priority, {"priority": priority, "waiting": 0, "oldest_wait_ms": 0,
                                                 "tenants": {}, "replicas": {}})
            p["waiting"] += 1
            p["oldest_wait_ms"] = max(p["oldest_wait_ms"], now_ms - enqueued)
            p["tenants"][tenant or "(none)"] = p["tenants"].get(tenant or "(none)", 0) + 1
            p["replicas"][owner_replica] = p["replicas"].get(owner_replica, 0) + 1
        flow = pool.flow
        return {"pool": pool.name, "room": sum(r.free_slots for r in endpoints.values()),
                "saturated": not any(r.has_room for r in endpoints.values()),
                "endpoints": [{"endpoint": key, **asdict(r)} for key, r in endpoints.items()],
                "settings": {"saturation_waiting": flow.saturation_waiting,
                             "saturation_kv_cache": flow.saturation_kv_cache, "release_waiting": flow.release_waiting,
                             "priority_reserve": flow.priority_reserve, "queue_ttl_ms": flow.queue_ttl_ms,
                             "max_queued": flow.max_queued},
                "waiting": len(waiting), "grants_outstanding": grants,
                "by_priority": [priorities[p] for p in sorted(priorities, reverse=True)],
                "this_replica": [w for w in ctx.flow.waiting_here() if w["pool"] == pool.name]}

    @app.get("/admin/models", summary="Models, rewrites and objectives as loaded")
    async def models(_: Reader) -> dict[str, Any]:
        config = ctx.snapshots.current.config
        if config is None:
            return {"generation": None, "models": {}, "objectives": {}}
        return {"generation": config.generation,
                "models": {pool: [{"name": m.name or "*", "criticality": m.criticality.value, "priority": m.priority,
                                   "queue_ttl_ms": m.queue_ttl_ms or None,
                                   "targets": [{"name": t.name, "weight": t.weight} for t in m.targets]}
                                  for m in listed.values()] for pool, listed in config.models.items()},
                "objectives": {pool: {o.name: o.priority for o in listed.values()}
                               for pool, listed in config.objectives.items()}}

    @app.get("/admin/fleet", summary="Picker replicas, collectors and what each scrapes, the controller leader")
    async def fleet(_: Reader) -> dict[str, Any]:
        config = ctx.snapshots.current.config
        pools = sorted(config.pools) if config else []
        view = await ctx.store.read_fleet(pools)
        now_ms = ctx.placement.now_ms()
        live = sorted(c for c, expiry in view.collectors.items() if expiry > now_ms)
        endpoints = sorted({e.key for p in (config.pools.values() if config else ()) for e in p.endpoints})
        owns: dict[str, list[str]] = {c: [] for c in live}
        for e in endpoints:
            if live:
                owns[owner(e, live)].append(e)
        return {"this_replica": ctx.replica, "config_generation": config.generation if config else None,
                "controller_leader": view.leader,
                "pickers": {pool: {r: {"lease_expires_in_ms": expiry - now_ms} for r, expiry in members.items()}
                            for pool, members in view.pickers.items()},
                "collectors": {c: {"lease_expires_in_ms": view.collectors[c] - now_ms, "endpoints": owns.get(c, [])}
                               for c in sorted(view.collectors)}}

    @app.post("/admin/explain", summary="The decision the pickers would make now for this body; changes nothing")
    async def explain(request: Request, _: Reader,
                      pool: Annotated[str | None, Query(description="namespace/name; default: by the model")] = None,
                      path: Annotated[str, Query(description="the OpenAI endpoint")] = "/v1/chat/completions",
                      subset: Annotated[str | None, Query(
                          description="the gateway's subset hint: the only endpoints (ip:port, comma-separated) "
                                      "the request may go to")] = None,
                      mirror_pool: Annotated[str | None, Query(
                          description="the pool the route mirrors to (namespace/name)")] = None,
                      mirror_fraction: Annotated[float, Query(ge=0, le=1)] = 1.0,
                      ) -> dict[str, Any]:
        """The request as the gateway would hand it over: the objective and tenant headers
        (`x-gateway-inference-objective`, `x-gateway-inference-fairness-id`) count as they do on the route."""
        headers = {k.lower(): v for k, v in request.headers.items()}
        arrival = Arrival(pool, path, await request.body(),
                          frozenset(e.strip() for e in subset.split(",") if e.strip()) if subset is not None else None,
                          Mirror(mirror_pool, mirror_fraction) if mirror_pool else None,
                          next((headers[h] for h in OBJECTIVE_HEADERS if h in headers), None),
                          next((headers[h] for h in FAIRNESS_HEADERS if h in headers), ""))
        try:
            explained = await ctx.director.explain(arrival)
        except GatewayError as err:
            return JSONResponse(err.body(), status_code=err.status)  # type: ignore[return-value]

        def decision(role: RoleRequest, plan: Plan, trace: Trace) -> dict[str, Any]:
            chosen = plan.decision.endpoints
            return {"role": role.role.value, "profile": role.profile.value, "pool": role.request.pool.name,
                    "prompt_blocks": len(role.request.block_hashes),
                    "matched_blocks": {c.endpoint.key: c.matched_blocks for c in chosen},
                    "pick": chosen[0].endpoint.key, "pick_name": chosen[0].endpoint.name,
                    "fallbacks": [c.endpoint.key for c in chosen[1:]], **_trace_json(trace)}

        placement_request = explained.request
        by_source: dict[str, dict[str, int]] = {}
        if placement_request.speculative:  # an index built from engine events: what the engine said, and what we guess
            plan = explained.plans[0][1]
            for c in plan.decision.endpoints:
                events = await ctx.store.event_depth(placement_request.pool.name, c.endpoint.key,
                                                     placement_request.block_hashes)
                by_source[c.endpoint.key] = {"event": events, "speculative": max(0, c.matched_blocks - events)}
        # The primary's decision at the top level; every role's (an SGLang PD pool's prefill, a mirror) under
        # `roles`; `flow`: placed now, or queued or shed by flow control.
        return {"model": placement_request.model, "target_model": placement_request.target_model,
                "pool": placement_request.pool.name, "strategy": placement_request.pool.strategy.value,
                "priority": placement_request.priority, "tenant": placement_request.tenant,
                "flow": explained.flow, "dropped": [r.value for r in explained.dropped],
                "prefix_index": "events" if placement_request.speculative else "approximate",
                "matched_by_source": by_source,
                **{k: v for k, v in decision(*explained.plans[0]).items() if k not in ("role", "profile", "pool")},
                "roles": [decision(*p) for p in explained.plans]}

    @app.post("/admin/pools/{namespace}/{name}/endpoints/{endpoint}/drain", status_code=204,
              summary="Drain an endpoint: no new requests within one snapshot refresh; running ones finish")
    async def drain(namespace: str, name: str, endpoint: str, _: Annotated[str, Depends(admin)]) -> None:
        await _set_drained(namespace, name, endpoint, True)

    @app.delete("/admin/pools/{namespace}/{name}/endpoints/{endpoint}/drain", status_code=204,
                summary="Undo a drain")
    async def undrain(namespace: str, name: str, endpoint: str, _: Annotated[str, Depends(admin)]) -> None:
        await _set_drained(namespace, name, endpoint, False)

    async def _set_drained(namespace: str, name: str, endpoint: str, draining: bool) -> None:
        pool = pool_of(namespace, name)
        if endpoint not in {e.key for e in pool.endpoints}:
            raise HTTPException(404, f"No endpoint {endpoint} in pool {pool.name}.")
        await ctx.store.set_drained(pool.name, endpoint, draining)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def status_page() -> str:
        return STATUS_PAGE.read_text()

    return app
