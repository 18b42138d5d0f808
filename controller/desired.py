"""From manifests to the desired state: pools with their endpoints, models, Service endpoints.

Every identity is `namespace/name`: a pool's, a Service's, a Gateway's. References
resolve in the referrer's namespace unless they name another.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from controller.manifests import Manifests, PodSpec
from controller.selectors import LabelSelector
from gateway_state.records import (
    ANY_MODEL,
    Criticality,
    Endpoint,
    FailureMode,
    Model,
    Objective,
    PDProfile,
    Pool,
    Runtime,
    Strategy,
    TargetModel,
)


@dataclass(frozen=True)
class DesiredState:
    pools: dict[str, Pool]
    models: dict[str, dict[str, Model]]  # pool -> model name -> model
    # (service id, service port) -> the ready pods it selects, at the target port
    services: dict[tuple[str, int], tuple[Endpoint, ...]]
    service_lb: dict[str, str] = field(default_factory=dict)  # service id -> Envoy lb_policy
    warnings: list[str] = field(default_factory=list)
    objectives: dict[str, dict[str, Objective]] = field(default_factory=dict)


def _members(pods: list[PodSpec], namespace: str, selector: LabelSelector) -> list[PodSpec]:
    """Ready pods with an address; a pod being deleted is draining and takes no new requests."""
    return sorted(
        (p for p in pods if p.meta.namespace == namespace and p.ready and p.ip and not p.meta.deleting
         and selector.matches(p.meta.labels)),
        key=lambda p: p.meta.name,
    )


def _endpoints(pods: list[PodSpec], ports: tuple[int, ...]) -> tuple[Endpoint, ...]:
    """One endpoint per pod and port; with several ports each is named `pod:port`."""
    return tuple(Endpoint(p.meta.name if len(ports) == 1 else f"{p.meta.name}:{port}", p.ip or "", port,
                          dict(p.meta.labels))
                 for p in pods for port in ports)


def _targets(pairs: tuple[tuple[str, int], ...]) -> tuple[TargetModel, ...]:
    return tuple(TargetModel(n, w) for n, w in pairs)


def build(m: Manifests) -> DesiredState:
    warnings: list[str] = []
    policies = {p.pool: p for p in m.policies}
    listed = {spec.pool for spec in m.models}
    pools: dict[str, Pool] = {}
    for spec in m.pools:
        policy = policies.get(spec.meta.id)
        strategy = Strategy(spec.strategy)
        runtime = Runtime(spec.runtime)
        pd = None
        if policy is not None:
            runtime = Runtime(policy.runtime) if policy.runtime else runtime
            strategy = Strategy.PREFIX_CACHE if policy.prefix_cache else strategy
            if policy.pd_role_label:
                pd = PDProfile(policy.pd_role_label, policy.bootstrap_port or 8998)
        endpoints = _endpoints(_members(m.pods, spec.meta.namespace, spec.selector), spec.target_ports)
        pools[spec.meta.id] = Pool(spec.meta.id, spec.target_ports, strategy, runtime, FailureMode(spec.failure_mode),
                                   endpoints, pd, spec.meta.id in listed, spec.app_protocol, spec.flow,
                                   spec.kv_events)
    for policy in m.policies:
        if policy.pool not in pools:
            warnings.append(f"{policy.meta.where}: spec.poolRef.name: no InferencePool {policy.pool!r}")

    models: dict[str, dict[str, Model]] = {name: {} for name in pools}
    for model in sorted(m.models, key=lambda s: s.meta.created):
        if model.pool not in pools:
            warnings.append(f"{model.meta.where}: spec.poolRef.name: no InferencePool {model.pool!r}")
            continue
        models[model.pool].setdefault(model.model_name, Model(model.model_name, model.pool,
                                                              Criticality(model.criticality),
                                                              _targets(model.targets), model.queue_ttl_ms))
    # Rewrites: the oldest resource first, the first matching rule within one; an exact
    # match wins over a rule for every model, and an InferenceModel over both.
    for rewrite in sorted(m.rewrites, key=lambda r: r.meta.created):
        if rewrite.pool not in pools:
            warnings.append(f"{rewrite.meta.where}: spec.poolRef.name: no InferencePool {rewrite.pool!r}")
            continue
        for rule in rewrite.rules:
            for name in rule.models or (ANY_MODEL,):
                models[rewrite.pool].setdefault(name, Model(name, rewrite.pool, targets=_targets(rule.targets)))

    objectives: dict[str, dict[str, Objective]] = {name: {} for name in pools}
    for objective in m.objectives:
        if objective.pool not in pools:
            warnings.append(f"{objective.meta.where}: spec.poolRef.name: no InferencePool {objective.pool!r}")
            continue
        objectives[objective.pool][objective.meta.name] = Objective(objective.meta.name, objective.pool,
                                                                    objective.priority)

    services: dict[tuple[str, int], tuple[Endpoint, ...]] = {}
    for svc in m.services:
        selector = LabelSelector(tuple(sorted(svc.selector.items())))
        members = _members(m.pods, svc.meta.namespace, selector) if svc.selector else []
        for port, target in svc.ports:
            services[(svc.meta.id, port)] = tuple(Endpoint(p.meta.name, p.ip or "", target, dict(p.meta.labels))
                                                  for p in members)

    gateways = {g.meta.id for g in m.gateways}
    for route in m.routes:
        for gateway, _ in route.parents:
            if gateway not in gateways:
                warnings.append(f"{route.meta.where}: spec.parentRefs: no Gateway {gateway!r}")
        for route_rule in route.rules:
            for ref in (*route_rule.backends, *(mirror.backend for mirror in route_rule.mirrors)):
                known = ref.id in pools if ref.kind == "InferencePool" else (ref.id, ref.port) in services
                if not known:
                    warnings.append(f"{route.meta.where}: backendRef {ref.kind} {ref.id!r}"
                                    f"{'' if ref.port is None else f' port {ref.port}'} is not declared; "
                                    "its requests get 503")
    return DesiredState(pools, {p: ms for p, ms in models.items() if ms}, services,
                        {s.meta.id: s.lb_policy for s in m.services}, warnings,
                        {p: o for p, o in objectives.items() if o})
