"""From manifests to the desired state: pools with their endpoints, models, Service endpoints."""

from __future__ import annotations

from dataclasses import dataclass, field

from controller.manifests import Manifests, PodSpec
from controller.selectors import LabelSelector
from gateway_state.records import (
    Criticality,
    Endpoint,
    FailureMode,
    Model,
    PDProfile,
    Pool,
    Runtime,
    Strategy,
    TargetModel,
)


@dataclass(frozen=True)
class DesiredState:
    pools: dict[str, Pool]
    models: dict[str, Model]
    # (service name, service port) -> the ready pods it selects, at the target port
    services: dict[tuple[str, int], tuple[Endpoint, ...]]
    service_lb: dict[str, str] = field(default_factory=dict)  # service name -> Envoy lb_policy
    warnings: list[str] = field(default_factory=list)


def _members(pods: list[PodSpec], namespace: str, selector: LabelSelector) -> list[PodSpec]:
    return sorted(
        (p for p in pods if p.meta.namespace == namespace and p.ready and p.ip and selector.matches(p.meta.labels)),
        key=lambda p: p.meta.name,
    )


def build(m: Manifests) -> DesiredState:
    warnings: list[str] = []
    policies = {p.pool: p for p in m.policies}
    pools: dict[str, Pool] = {}
    for spec in m.pools:
        policy = policies.get(spec.meta.name)
        strategy = Strategy(spec.strategy)
        runtime = Runtime(spec.runtime)
        pd = None
        if policy is not None:
            runtime = Runtime(policy.runtime) if policy.runtime else runtime
            strategy = Strategy.PREFIX_CACHE if policy.prefix_cache else strategy
            if policy.pd_role_label:
                pd = PDProfile(policy.pd_role_label, policy.bootstrap_port or 8998)
        endpoints = tuple(
            Endpoint(p.meta.name, p.ip or "", spec.target_port, dict(p.meta.labels))
            for p in _members(m.pods, spec.meta.namespace, spec.selector)
        )
        pools[spec.meta.name] = Pool(spec.meta.name, spec.target_port, strategy, runtime,
                                     FailureMode(spec.failure_mode), endpoints, pd)
    for policy in m.policies:
        if policy.pool not in pools:
            warnings.append(f"{policy.meta.where}: spec.poolRef.name: no InferencePool {policy.pool!r}")

    models: dict[str, Model] = {}
    for spec in m.models:
        if spec.pool not in pools:
            warnings.append(f"{spec.meta.where}: spec.poolRef.name: no InferencePool {spec.pool!r}")
            continue
        models[spec.model_name] = Model(spec.model_name, spec.pool, Criticality(spec.criticality),
                                        tuple(TargetModel(n, w) for n, w in spec.targets))

    services: dict[tuple[str, int], tuple[Endpoint, ...]] = {}
    for svc in m.services:
        selector = LabelSelector(tuple(sorted(svc.selector.items())))
        members = _members(m.pods, svc.meta.namespace, selector) if svc.selector else []
        for port, target in svc.ports:
            services[(svc.meta.name, port)] = tuple(Endpoint(p.meta.name, p.ip or "", target, dict(p.meta.labels))
                                                    for p in members)

    gateways = {g.meta.name for g in m.gateways}
    for route in m.routes:
        for gateway, _ in route.parents:
            if gateway not in gateways:
                warnings.append(f"{route.meta.where}: spec.parentRefs: no Gateway {gateway!r}")
        for rule in route.rules:
            for ref in (*rule.backends, *rule.mirrors):
                known = ref.name in pools if ref.kind == "InferencePool" else (ref.name, ref.port) in services
                if not known:
                    warnings.append(f"{route.meta.where}: backendRef {ref.kind} {ref.name!r}"
                                    f"{'' if ref.port is None else f' port {ref.port}'} is not declared; "
                                    "its requests get 503")
    return DesiredState(pools, models, services, {s.meta.name: s.lb_policy for s in m.services}, warnings)
