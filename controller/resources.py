"""One parser per kind, and the directory loader that dispatches to them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from controller.manifests import (
    ANNOTATION_LB_POLICY,
    ANNOTATION_RUNTIME,
    ANNOTATION_STRATEGY,
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
    PodSpec,
    RouteRule,
    ServiceSpec,
    TrafficPolicySpec,
    iter_documents,
)
from controller.selectors import LabelSelector, requirement

STRATEGIES = ("DEFAULT", "PREFIX_CACHE")
RUNTIMES = ("vllm", "sglang")
FAILURE_MODES = ("FailOpen", "FailClose")
CRITICALITIES = ("Critical", "Standard", "Sheddable")
PATH_TYPES = ("PathPrefix", "Exact")
LB_POLICIES = ("ROUND_ROBIN", "RANDOM", "LEAST_REQUEST")


def _pool(doc: Document, meta: Meta, api: str, out: Manifests) -> None:
    if api.endswith("/v1alpha2"):
        selector_map = doc.string_map("spec.selector")
        if not selector_map:
            raise ManifestError(doc.where, "spec.selector", "is required and must not be empty")
        selector = LabelSelector(tuple(sorted(selector_map.items())))
        port = doc.port("spec.targetPortNumber", doc.get("spec.targetPortNumber", int, required=True))
        failure = doc.get("spec.extensionRef.failureMode", str, "FailOpen")
        failure_path = "spec.extensionRef.failureMode"
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
        ports = doc.get("spec.targetPorts", list, required=True)
        if len(ports) != 1 or not isinstance(ports[0], dict):
            raise ManifestError(doc.where, "spec.targetPorts", "must hold exactly one {number: PORT}")
        port = doc.port("spec.targetPorts[0].number", ports[0].get("number"))
        failure = doc.get("spec.endpointPickerRef.failureMode", str, "FailOpen")
        failure_path = "spec.endpointPickerRef.failureMode"
    strategy = meta.annotations.get(ANNOTATION_STRATEGY, "DEFAULT")
    runtime = meta.annotations.get(ANNOTATION_RUNTIME, "vllm")
    out.pools.append(InferencePoolSpec(
        meta, selector, port,
        doc.enum(f"metadata.annotations[{ANNOTATION_STRATEGY}]", strategy, STRATEGIES),
        doc.enum(f"metadata.annotations[{ANNOTATION_RUNTIME}]", runtime, RUNTIMES),
        doc.enum(failure_path, failure, FAILURE_MODES),
    ))


def _model(doc: Document, meta: Meta, api: str, out: Manifests) -> None:
    name = doc.get("spec.modelName", str, required=True)
    criticality = doc.enum("spec.criticality", doc.get("spec.criticality", str, "Standard"), CRITICALITIES)
    pool = doc.get("spec.poolRef.name", str, required=True)
    targets = []
    for i, t in enumerate(doc.get("spec.targetModels", list, [])):
        sub = Document(t, doc.where)
        weight = sub.get("weight", int, 1)
        if not 0 <= weight <= 1_000_000:
            raise ManifestError(doc.where, f"spec.targetModels[{i}].weight", "must be between 0 and 1000000")
        targets.append((sub.get("name", str, required=True), weight))
    if targets and sum(w for _, w in targets) == 0:
        raise ManifestError(doc.where, "spec.targetModels", "weights must not all be 0")
    out.models.append(InferenceModelSpec(meta, name, criticality, pool, tuple(targets) or ((name, 1),)))


def _policy(doc: Document, meta: Meta, api: str, out: Manifests) -> None:
    pool = doc.get("spec.poolRef.name", str, required=True)
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


def _backend(doc: Document, item: object, path: str) -> BackendRef:
    sub = Document(item, doc.where)
    kind = sub.get("kind", str, "Service")
    if kind not in ("Service", "InferencePool"):
        raise ManifestError(doc.where, f"{path}.kind", f"must be Service or InferencePool, got {kind!r}")
    port = sub.get("port", int)
    if kind == "Service" and port is None:
        raise ManifestError(doc.where, f"{path}.port", "is required for a Service backend")
    return BackendRef(kind, sub.get("name", str, required=True),
                      doc.port(f"{path}.port", port) if port is not None else None, sub.get("weight", int, 1))


def _route(doc: Document, meta: Meta, api: str, out: Manifests) -> None:
    parents = tuple((Document(p, doc.where).get("name", str, required=True),
                     Document(p, doc.where).get("sectionName", str)) for p in doc.get("spec.parentRefs", list, []))
    rules = []
    for i, rule in enumerate(doc.get("spec.rules", list, [])):
        sub, path = Document(rule, doc.where), f"spec.rules[{i}]"
        matches = []
        for j, m in enumerate(sub.get("matches", list, [])):
            mdoc = Document(m, doc.where)
            kind = doc.enum(f"{path}.matches[{j}].path.type", mdoc.get("path.type", str, "PathPrefix"), PATH_TYPES)
            matches.append((kind, mdoc.get("path.value", str, "/")))
        backends = tuple(_backend(doc, b, f"{path}.backendRefs[{k}]")
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
            ref = _backend(doc, fdoc.get("requestMirror.backendRef", dict, required=True),
                           f"{path}.filters[{k}].requestMirror.backendRef")
            if ref.kind != "Service":
                raise ManifestError(doc.where, f"{path}.filters[{k}]", "mirrors go to a Service")
            mirrors.append(ref)
        rules.append(RouteRule(tuple(matches) or (("PathPrefix", "/"),), backends, tuple(mirrors)))
    out.routes.append(HTTPRouteSpec(meta, parents, tuple(doc.get("spec.hostnames", list, [])), tuple(rules)))


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
    ("inferenceextension.alibabacloud.com", "InferenceTrafficPolicy"): _policy,
    ("gateway.networking.k8s.io", "Gateway"): _gateway,
    ("gateway.networking.k8s.io", "HTTPRoute"): _route,
    ("v1", "Service"): _service,
    ("v1", "Pod"): _pod,
}


def load_directory(directory: Path) -> Manifests:
    out = Manifests()
    for file_name, index, data in iter_documents(directory):
        where = f"{file_name} document {index}"
        if not isinstance(data, dict):
            raise ManifestError(where, "", "must be a mapping with apiVersion and kind")
        doc = Document(data, where)
        kind = doc.get("kind", str, required=True)
        api = doc.get("apiVersion", str, required=True)
        name = doc.get("metadata.name", str, required=True)
        doc.where = f"{where} ({kind} {name})"
        meta = Meta(kind, name, doc.get("metadata.namespace", str, "default"), doc.string_map("metadata.labels"),
                    doc.string_map("metadata.annotations"), doc.where)
        parser = PARSERS.get((api.split("/")[0], kind))
        if parser is None:
            out.ignored.append(doc.where)
            continue
        parser(doc, meta, api, out)
    _check_unique(out)
    return out


def _check_unique(out: Manifests) -> None:
    seen: dict[tuple[str, str], str] = {}
    for item in (*out.pools, *out.models, *out.gateways, *out.routes, *out.services, *out.pods):
        key = (item.meta.kind, item.meta.name)
        if key in seen:
            raise ManifestError(item.meta.where, "metadata.name", f"duplicates {seen[key]}")
        seen[key] = item.meta.where
    models: dict[str, str] = {}
    for m in out.models:
        if m.model_name in models:
            raise ManifestError(m.meta.where, "spec.modelName",
                                f"{m.model_name!r} is already served by {models[m.model_name]}")
        models[m.model_name] = m.meta.where
