"""One parser per kind, and the directory loader that dispatches to them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from controller.manifests import (
    ANNOTATION_KV_EVENTS_PORT,
    ANNOTATION_KV_EVENTS_REPLAY_PORT,
    ANNOTATION_LB_POLICY,
    ANNOTATION_MAX_QUEUED,
    ANNOTATION_PREFIX_INDEX,
    ANNOTATION_PRIORITY_RESERVE,
    ANNOTATION_QUEUE_TTL,
    ANNOTATION_RELEASE_WAITING,
    ANNOTATION_RUNTIME,
    ANNOTATION_SATURATION_KV_CACHE,
    ANNOTATION_SATURATION_WAITING,
    ANNOTATION_STRATEGY,
    PREFIX_INDEXES,
    BackendRef,
    Document,
    GatewaySpec,
    HTTPRouteSpec,
    InferenceModelSpec,
    InferencePoolSpec,
    ListenerSpec,
    ManifestError,
    Manifests,
    Meta,
    MirrorSpec,
    ModelRewriteSpec,
    ObjectiveSpec,
    PodSpec,
    RewriteRule,
    RouteRule,
    ServiceSpec,
    TrafficPolicySpec,
    iter_documents,
)
from controller.selectors import LabelSelector, requirement
from gateway_state.records import FlowControl, KvEvents, Runtime, pool_id

STRATEGIES = ("DEFAULT", "PREFIX_CACHE")
RUNTIMES = tuple(r.value for r in Runtime)
FAILURE_MODES = ("FailOpen", "FailClose")
CRITICALITIES = ("Critical", "Standard", "Sheddable")
PATH_TYPES = ("PathPrefix", "Exact")
LB_POLICIES = ("ROUND_ROBIN", "RANDOM", "LEAST_REQUEST")
APP_PROTOCOLS = ("http", "kubernetes.io/h2c")


def _pool(doc: Document, meta: Meta, api: str, out: Manifests) -> None:
    if api.endswith("/v1alpha2"):
        selector_map = doc.string_map("spec.selector")
        if not selector_map:
            raise ManifestError(doc.where, "spec.selector", "is required and must not be empty")
        selector = LabelSelector(tuple(sorted(selector_map.items())))
        ports: tuple[int, ...] = (doc.port("spec.targetPortNumber",
                                           doc.get("spec.targetPortNumber", int, required=True)),)
        failure = doc.get("spec.extensionRef.failureMode", str, "FailOpen")
        failure_path = "spec.extensionRef.failureMode"
        protocol = "http"
    else:  # inference.networking.k8s.io/v1
        match = doc.string_map("spec.selector.matchLabels")
        exprs = []
        for i, e in enumerate(doc.get("spec.selector.matchExpressions", list, [])):
            path = f"spec.selector.matchExpressions[{i}]"
            sub = Document(e, doc.where)
            try:
                exprs.append(requirement(sub.get("key", str, required=True), sub.get("operator", str, required=True),
                                         [str(v) for v in sub.get("values", list, [])]))
            except ValueError as exc:
                raise ManifestError(doc.where, path, str(exc)) from None
        selector = LabelSelector(tuple(sorted(match.items())), tuple(exprs))
        if selector.empty:
            raise ManifestError(doc.where, "spec.selector.matchLabels", "is required and must not be empty")
        listed = doc.get("spec.targetPorts", list, required=True)
        if not 1 <= len(listed) <= 8:
            raise ManifestError(doc.where, "spec.targetPorts", "must hold 1 to 8 ports")
        ports = tuple(doc.port(f"spec.targetPorts[{i}].number", Document(p, doc.where).get("number", int))
                      for i, p in enumerate(listed))
        if len(set(ports)) != len(ports):
            raise ManifestError(doc.where, "spec.targetPorts", "must not repeat a port")
        # The v1 API's default: a gateway whose picker fails drops the request.
        failure = doc.get("spec.endpointPickerRef.failureMode", str, "FailClose")
        failure_path = "spec.endpointPickerRef.failureMode"
        protocol = doc.enum("spec.appProtocol", doc.get("spec.appProtocol", str, "http"), APP_PROTOCOLS)
    strategy = meta.annotations.get(ANNOTATION_STRATEGY, "DEFAULT")
    runtime = meta.annotations.get(ANNOTATION_RUNTIME, "vllm")
    out.pools.append(InferencePoolSpec(
        meta, selector, ports,
        doc.enum(f"metadata.annotations[{ANNOTATION_STRATEGY}]", strategy, STRATEGIES),
        doc.enum(f"metadata.annotations[{ANNOTATION_RUNTIME}]", runtime, RUNTIMES),
        doc.enum(failure_path, failure, FAILURE_MODES),
        protocol,
        _flow(doc, meta),
        _kv_events(doc, meta),
    ))


def _kv_events(doc: Document, meta: Meta) -> KvEvents | None:
    index = doc.enum(f"metadata.annotations[{ANNOTATION_PREFIX_INDEX}]",
                     meta.annotations.get(ANNOTATION_PREFIX_INDEX, "approximate"), PREFIX_INDEXES)
    if index != "events":
        return None
    d = KvEvents()
    return KvEvents(int(doc.annotation_number(meta, ANNOTATION_KV_EVENTS_PORT, d.port, 1, 65535)),
                    int(doc.annotation_number(meta, ANNOTATION_KV_EVENTS_REPLAY_PORT, d.replay_port, 0, 65535)))


def _flow(doc: Document, meta: Meta) -> FlowControl:
    d = FlowControl()
    return FlowControl(
        doc.annotation_number(meta, ANNOTATION_SATURATION_WAITING, d.saturation_waiting, 1, 1_000_000),
        doc.annotation_number(meta, ANNOTATION_SATURATION_KV_CACHE, d.saturation_kv_cache, 0.01, 1.0),
        doc.annotation_number(meta, ANNOTATION_RELEASE_WAITING, d.release_waiting, 0, 1_000_000),
        doc.annotation_duration_ms(meta, ANNOTATION_QUEUE_TTL, d.queue_ttl_ms),
        int(doc.annotation_number(meta, ANNOTATION_MAX_QUEUED, d.max_queued, 0, 1_000_000)),
        int(doc.annotation_number(meta, ANNOTATION_PRIORITY_RESERVE, d.priority_reserve, 0, 1_000_000)),
    )


def _model(doc: Document, meta: Meta, api: str, out: Manifests) -> None:
    name = doc.get("spec.modelName", str, required=True)
    criticality = doc.enum("spec.criticality", doc.get("spec.criticality", str, "Standard"), CRITICALITIES)
    pool = _pool_ref(doc, meta)
    targets = _targets(doc, "spec.targetModels", "name")
    out.models.append(InferenceModelSpec(meta, name, criticality, pool, targets or ((name, 1),),
                                         doc.annotation_duration_ms(meta, ANNOTATION_QUEUE_TTL, 0)))


def _pool_ref(doc: Document, meta: Meta) -> str:
    """A poolRef names a pool in the referrer's own namespace."""
    kind = doc.get("spec.poolRef.kind", str, "InferencePool")
    if kind != "InferencePool":
        raise ManifestError(doc.where, "spec.poolRef.kind", f"must be InferencePool, got {kind!r}")
    return pool_id(meta.namespace, doc.get("spec.poolRef.name", str, required=True))


def _targets(doc: Document, path: str, name_field: str) -> tuple[tuple[str, int], ...]:
    targets = []
    for i, t in enumerate(doc.get(path, list, [])):
        sub = Document(t, doc.where)
        weight = sub.get("weight", int, 1)
        if not 0 <= weight <= 1_000_000:
            raise ManifestError(doc.where, f"{path}[{i}].weight", "must be between 0 and 1000000")
        name = sub.get(name_field, str, required=True)
        if not name:
            raise ManifestError(doc.where, f"{path}[{i}].{name_field}", "must not be empty")
        targets.append((name, weight))
    if targets and sum(w for _, w in targets) == 0:
        raise ManifestError(doc.where, path, "weights must not all be 0")
    return tuple(targets)


def _objective(doc: Document, meta: Meta, api: str, out: Manifests) -> None:
    priority = doc.get("spec.priority", int, 0)
    if not -1_000_000 <= priority <= 1_000_000:
        raise ManifestError(doc.where, "spec.priority", "must be between -1000000 and 1000000")
    out.objectives.append(ObjectiveSpec(meta, _pool_ref(doc, meta), priority))


def _rewrite(doc: Document, meta: Meta, api: str, out: Manifests) -> None:
    rules = []
    for i, rule in enumerate(doc.get("spec.rules", list, required=True)):
        sub, path = Document(rule, doc.where), f"spec.rules[{i}]"
        models = []
        for j, match in enumerate(sub.get("matches", list, [])):
            mdoc = Document(match, doc.where)
            doc.enum(f"{path}.matches[{j}].model.type", mdoc.get("model.type", str, "Exact"), ("Exact",))
            value = mdoc.get("model.value", str, required=True)
            if not value:
                raise ManifestError(doc.where, f"{path}.matches[{j}].model.value", "must not be empty")
            models.append(value)
        targets = _targets(sub, "targets", "modelRewrite")
        if not targets:
            raise ManifestError(doc.where, f"{path}.targets", "needs at least one target")
        rules.append(RewriteRule(tuple(models), targets))
    out.rewrites.append(ModelRewriteSpec(meta, _pool_ref(doc, meta), tuple(rules)))


def _policy(doc: Document, meta: Meta, api: str, out: Manifests) -> None:
    pool = _pool_ref(doc, meta)
    runtime = doc.get("spec.modelServerRuntime", str)
    if runtime is not None:
        doc.enum("spec.modelServerRuntime", runtime, RUNTIMES)
    profile = doc.get("spec.profile", dict, {})
    prefix_cache, role_label, bootstrap = False, None, None
    for mode, body in profile.items():
        sub = Document(body or {}, doc.where)
        prefix_cache = prefix_cache or sub.get("trafficPolicy.prefixCache", dict) is not None
        if mode == "pd":
            role_label = sub.get("pdRoleLabelName", str, required=True)
            port = sub.get("kvTransfer.bootstrapPort", int)
            bootstrap = doc.port("spec.profile.pd.kvTransfer.bootstrapPort", port) if port is not None else None
    out.policies.append(TrafficPolicySpec(meta, pool, runtime, prefix_cache, role_label, bootstrap))


def _gateway(doc: Document, meta: Meta, api: str, out: Manifests) -> None:
    listeners = []
    for i, item in enumerate(doc.get("spec.listeners", list, required=True)):
        sub, path = Document(item, doc.where), f"spec.listeners[{i}]"
        protocol = sub.get("protocol", str, required=True)
        if protocol != "HTTP":
            raise ManifestError(doc.where, f"{path}.protocol", f"only HTTP listeners are supported, got {protocol!r}")
        listeners.append(ListenerSpec(sub.get("name", str, required=True),
                                      doc.port(f"{path}.port", sub.get("port", int, required=True)), protocol))
    out.gateways.append(GatewaySpec(meta, tuple(listeners)))


def _backend(doc: Document, meta: Meta, item: object, path: str) -> BackendRef:
    sub = Document(item, doc.where)
    kind = sub.get("kind", str, "Service")
    if kind not in ("Service", "InferencePool"):
        raise ManifestError(doc.where, f"{path}.kind", f"must be Service or InferencePool, got {kind!r}")
    port = sub.get("port", int)
    if kind == "Service" and port is None:
        raise ManifestError(doc.where, f"{path}.port", "is required for a Service backend")
    return BackendRef(kind, sub.get("name", str, required=True),
                      doc.port(f"{path}.port", port) if port is not None else None, sub.get("weight", int, 1),
                      sub.get("namespace", str, meta.namespace))


def _mirror_fraction(doc: Document, mirror: Document, where: str) -> float:
    """Gateway API's `percent` (0-100) or `fraction` (numerator/denominator, 100 by default); all by default."""
    percent, fraction = mirror.get("percent", int), mirror.get("fraction", dict)
    if percent is not None and fraction is not None:
        raise ManifestError(doc.where, where, "set `percent` or `fraction`, not both")
    if percent is not None:
        if not 0 <= percent <= 100:
            raise ManifestError(doc.where, f"{where}.percent", f"must be 0-100, got {percent}")
        return float(percent) / 100
    if fraction is not None:
        f = Document(fraction, doc.where)
        numerator, denominator = f.get("numerator", int, required=True), f.get("denominator", int, 100)
        if denominator < 1 or not 0 <= numerator <= denominator:
            raise ManifestError(doc.where, f"{where}.fraction", "needs 0 <= numerator <= denominator, denominator >= 1")
        return float(numerator / denominator)
    return 1.0


def _route(doc: Document, meta: Meta, api: str, out: Manifests) -> None:
    parents = []
    for p in doc.get("spec.parentRefs", list, []):
        ref = Document(p, doc.where)
        parents.append((f"{ref.get('namespace', str, meta.namespace)}/{ref.get('name', str, required=True)}",
                        ref.get("sectionName", str)))
    rules = []
    for i, rule in enumerate(doc.get("spec.rules", list, [])):
        sub, path = Document(rule, doc.where), f"spec.rules[{i}]"
        matches = []
        for j, m in enumerate(sub.get("matches", list, [])):
            mdoc = Document(m, doc.where)
            kind = doc.enum(f"{path}.matches[{j}].path.type", mdoc.get("path.type", str, "PathPrefix"), PATH_TYPES)
            matches.append((kind, mdoc.get("path.value", str, "/")))
        backends = tuple(_backend(doc, meta, b, f"{path}.backendRefs[{k}]")
                         for k, b in enumerate(sub.get("backendRefs", list, [])))
        if sum(b.kind == "InferencePool" for b in backends) and len(backends) > 1:
            raise ManifestError(doc.where, f"{path}.backendRefs",
                                "an InferencePool backend must be the rule's only backend")
        mirrors = []
        for k, f in enumerate(sub.get("filters", list, [])):
            fdoc = Document(f, doc.where)
            ftype = fdoc.get("type", str, required=True)
            if ftype != "RequestMirror":
                raise ManifestError(doc.where, f"{path}.filters[{k}].type", f"filter {ftype!r} is not supported")
            where = f"{path}.filters[{k}].requestMirror"
            target = _backend(doc, meta, fdoc.get("requestMirror.backendRef", dict, required=True),
                              f"{where}.backendRef")
            if target.kind == "InferencePool" and not any(b.kind == "InferencePool" for b in backends):
                raise ManifestError(doc.where, f"{where}.backendRef", "mirroring to an InferencePool needs an "
                                    "InferencePool backend: its picker places the copy")
            fraction = _mirror_fraction(doc, Document(fdoc.get("requestMirror", dict), doc.where), where)
            mirrors.append(MirrorSpec(target, fraction))
        rules.append(RouteRule(tuple(matches) or (("PathPrefix", "/"),), backends, tuple(mirrors)))
    out.routes.append(HTTPRouteSpec(meta, tuple(parents), tuple(doc.get("spec.hostnames", list, [])),
                                    tuple(rules)))


def _service(doc: Document, meta: Meta, api: str, out: Manifests) -> None:
    ports = []
    for i, p in enumerate(doc.get("spec.ports", list, [])):
        sub, path = Document(p, doc.where), f"spec.ports[{i}]"
        port = doc.port(f"{path}.port", sub.get("port", int, required=True))
        target = sub.get("targetPort", int, port)
        ports.append((port, doc.port(f"{path}.targetPort", target)))
    policy = doc.enum(f"metadata.annotations[{ANNOTATION_LB_POLICY}]",
                      meta.annotations.get(ANNOTATION_LB_POLICY, "ROUND_ROBIN"), LB_POLICIES)
    out.services.append(ServiceSpec(meta, doc.string_map("spec.selector"), tuple(ports), policy))


def _pod(doc: Document, meta: Meta, api: str, out: Manifests) -> None:
    conditions = doc.get("status.conditions", list, [])
    ready_flags = [c.get("status") == "True" for c in conditions if isinstance(c, dict) and c.get("type") == "Ready"]
    ready = ready_flags[0] if ready_flags else doc.get("status.phase", str, "") == "Running"
    out.pods.append(PodSpec(meta, doc.get("status.podIP", str), ready))


Parser = Callable[[Document, Meta, str, Manifests], None]
PARSERS: dict[tuple[str, str], Parser] = {
    ("inference.networking.x-k8s.io", "InferencePool"): _pool,
    ("inference.networking.k8s.io", "InferencePool"): _pool,
    ("inference.networking.x-k8s.io", "InferenceModel"): _model,
    ("inference.networking.x-k8s.io", "InferenceObjective"): _objective,
    ("inference.networking.x-k8s.io", "InferenceModelRewrite"): _rewrite,
    # The llm-d router serves the same two kinds under its own group.
    ("llm-d.ai", "InferenceObjective"): _objective,
    ("llm-d.ai", "InferenceModelRewrite"): _rewrite,
    ("inferenceextension.alibabacloud.com", "InferenceTrafficPolicy"): _policy,
    ("gateway.networking.k8s.io", "Gateway"): _gateway,
    ("gateway.networking.k8s.io", "HTTPRoute"): _route,
    ("v1", "Service"): _service,
    ("v1", "Pod"): _pod,
}


def parse_object(data: object, where: str, out: Manifests, name_in_where: bool = True) -> None:
    """Parse one object (a YAML document or an API object) into `out`; ManifestError names the field."""
    if not isinstance(data, dict):
        raise ManifestError(where, "", "must be a mapping with apiVersion and kind")
    doc = Document(data, where)
    kind = doc.get("kind", str, required=True)
    api = doc.get("apiVersion", str, required=True)
    name = doc.get("metadata.name", str, required=True)
    if name_in_where:
        doc.where = f"{where} ({kind} {name})"
    meta = Meta(kind, name, doc.get("metadata.namespace", str, "default"), doc.string_map("metadata.labels"),
                doc.string_map("metadata.annotations"), doc.where, doc.get("metadata.creationTimestamp", str, ""),
                doc.get("metadata.deletionTimestamp", str) is not None)
    parser = PARSERS.get((api.split("/")[0], kind))
    if parser is None:
        out.ignored.append(doc.where)
        return
    parser(doc, meta, api, out)


def load_directory(directory: Path) -> Manifests:
    out = Manifests()
    for file_name, index, data in iter_documents(directory):
        parse_object(data, f"{file_name} document {index}", out)
    conflicts = find_conflicts(out)
    if conflicts:
        raise conflicts[0]
    return out


def find_conflicts(out: Manifests) -> list[ManifestError]:
    """Objects that clash with an earlier (older) one: same kind and identity, or a model served twice."""
    conflicts: list[ManifestError] = []
    seen: dict[tuple[str, str], str] = {}
    item: Any
    for item in (*out.pools, *out.models, *out.objectives, *out.rewrites, *out.gateways, *out.routes,
                 *out.services, *out.pods):
        key = (item.meta.kind, item.meta.id)
        if key in seen:
            conflicts.append(ManifestError(item.meta.where, "metadata.name", f"duplicates {seen[key]}"))
        seen[key] = item.meta.where
    models: dict[tuple[str, str], str] = {}
    for m in sorted(out.models, key=lambda m: m.meta.created):
        if (m.pool, m.model_name) in models:
            conflicts.append(ManifestError(m.meta.where, "spec.modelName",
                                           f"{m.model_name!r} is already served by {models[(m.pool, m.model_name)]}"))
        models.setdefault((m.pool, m.model_name), m.meta.where)
    return conflicts
