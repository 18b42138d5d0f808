"""Kubernetes-style manifests the controller understands, parsed and validated.

Kinds the fleet does not act on (Deployment, ConfigMap, BackendTrafficPolicy, ...)
are accepted and ignored, so any directory of cluster YAML loads unchanged.
Every error names the file, the document and the field.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from controller.selectors import LabelSelector
from gateway_state.records import FlowControl, KvEvents

ANNOTATION_STRATEGY = "inference.networking.x-k8s.io/routing-strategy"
ANNOTATION_RUNTIME = "inference.networking.x-k8s.io/model-server-runtime"
# On a Service: Envoy's load-balancing policy for routes to it (default ROUND_ROBIN).
ANNOTATION_LB_POLICY = "inference-gateway.io/lb-policy"
# On an InferencePool: its flow control (gateway_state.records.FlowControl); on an InferenceModel,
# the queue time-to-live of its requests.
ANNOTATION_SATURATION_WAITING = "inference-gateway.io/saturation-waiting"
ANNOTATION_SATURATION_KV_CACHE = "inference-gateway.io/saturation-kv-cache"
ANNOTATION_RELEASE_WAITING = "inference-gateway.io/release-waiting"
ANNOTATION_PRIORITY_RESERVE = "inference-gateway.io/priority-reserve"
ANNOTATION_QUEUE_TTL = "inference-gateway.io/queue-ttl"
ANNOTATION_MAX_QUEUED = "inference-gateway.io/max-queued"
# The pool's prefix index: "approximate" (the pickers' placements, the default) or "events" (the engines'
# own KV-cache events, published on these ports of each pod).
ANNOTATION_PREFIX_INDEX = "inference-gateway.io/prefix-index"
ANNOTATION_KV_EVENTS_PORT = "inference-gateway.io/kv-events-port"
ANNOTATION_KV_EVENTS_REPLAY_PORT = "inference-gateway.io/kv-events-replay-port"
PREFIX_INDEXES = ("approximate", "events")


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}


class ManifestError(ValueError):
    def __init__(self, where: str, path: str, message: str) -> None:
        super().__init__(f"{where}: {path}: {message}" if path else f"{where}: {message}")
        self.where, self.path, self.message = where, path, message

    @property
    def field_message(self) -> str:
        """The problem without where it is: `spec.targetPorts[0].number: must be ...`."""
        return f"{self.path}: {self.message}" if self.path else self.message


@dataclass(frozen=True)
class Meta:
    kind: str
    name: str
    namespace: str
    labels: dict[str, str]
    annotations: dict[str, str]
    where: str  # "file.yaml document 2 (Kind name)" or "Kind namespace/name", for error messages
    created: str = ""  # metadata.creationTimestamp (RFC 3339, so it sorts); "" in files
    deleting: bool = False  # metadata.deletionTimestamp is set

    @property
    def id(self) -> str:
        """`namespace/name`: the identity across the fleet (see gateway_state.records.pool_id)."""
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class InferencePoolSpec:
    meta: Meta
    selector: LabelSelector
    target_ports: tuple[int, ...]
    strategy: str
    runtime: str
    failure_mode: str
    app_protocol: str = "http"
    flow: FlowControl = FlowControl()
    kv_events: KvEvents | None = None


@dataclass(frozen=True)
class InferenceModelSpec:
    meta: Meta
    model_name: str
    criticality: str
    pool: str  # pool id (namespace/name)
    targets: tuple[tuple[str, int], ...]
    queue_ttl_ms: int = 0


@dataclass(frozen=True)
class ObjectiveSpec:
    meta: Meta
    pool: str
    priority: int


@dataclass(frozen=True)
class RewriteRule:
    models: tuple[str, ...]  # exact model names; empty: every model
    targets: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class ModelRewriteSpec:
    meta: Meta
    pool: str
    rules: tuple[RewriteRule, ...]


@dataclass(frozen=True)
class TrafficPolicySpec:
    meta: Meta
    pool: str
    runtime: str | None
    prefix_cache: bool
    pd_role_label: str | None
    bootstrap_port: int | None


@dataclass(frozen=True)
class ListenerSpec:
    name: str
    port: int
    protocol: str


@dataclass(frozen=True)
class GatewaySpec:
    meta: Meta
    listeners: tuple[ListenerSpec, ...]


@dataclass(frozen=True)
class BackendRef:
    kind: str  # "InferencePool" or "Service"
    name: str
    port: int | None
    weight: int
    namespace: str = "default"

    @property
    def id(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class MirrorSpec:
    """A RequestMirror filter: a Service (Envoy copies, round robin) or an InferencePool (the picker
    places the copy), and the share of requests copied (Gateway API's `percent` or `fraction`)."""

    backend: BackendRef
    fraction: float = 1.0


@dataclass(frozen=True)
class RouteRule:
    matches: tuple[tuple[str, str], ...]  # (match type, path value)
    backends: tuple[BackendRef, ...]
    mirrors: tuple[MirrorSpec, ...]


@dataclass(frozen=True)
class HTTPRouteSpec:
    meta: Meta
    parents: tuple[tuple[str, str | None], ...]  # (gateway id namespace/name, listener section or None)
    hostnames: tuple[str, ...]
    rules: tuple[RouteRule, ...]


@dataclass(frozen=True)
class ServiceSpec:
    meta: Meta
    selector: dict[str, str]
    ports: tuple[tuple[int, int], ...]  # (service port, target port)
    lb_policy: str = "ROUND_ROBIN"


@dataclass(frozen=True)
class PodSpec:
    meta: Meta
    ip: str | None
    ready: bool


@dataclass
class Manifests:
    pools: list[InferencePoolSpec] = field(default_factory=list)
    models: list[InferenceModelSpec] = field(default_factory=list)
    objectives: list[ObjectiveSpec] = field(default_factory=list)
    rewrites: list[ModelRewriteSpec] = field(default_factory=list)
    policies: list[TrafficPolicySpec] = field(default_factory=list)
    gateways: list[GatewaySpec] = field(default_factory=list)
    routes: list[HTTPRouteSpec] = field(default_factory=list)
    services: list[ServiceSpec] = field(default_factory=list)
    pods: list[PodSpec] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # where of each document of a kind we do not act on


class Document:
    """Typed access to one YAML document; every failure names the field path."""

    def __init__(self, data: Any, where: str) -> None:
        self.data, self.where = data, where

    def get(self, path: str, kind: type | tuple[type, ...], default: Any = None, required: bool = False) -> Any:
        node: Any = self.data
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node or node[part] is None:
                if required:
                    raise ManifestError(self.where, path, "is required")
                return default
            node = node[part]
        if isinstance(node, bool) and kind in (int, (int,)):
            raise ManifestError(self.where, path, f"must be {_kind_name(kind)}, got {node!r}")
        if not isinstance(node, kind):
            raise ManifestError(self.where, path, f"must be {_kind_name(kind)}, got {type(node).__name__}")
        return node

    def port(self, path: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise ManifestError(self.where, path, f"must be a port number 1-65535, got {value!r}")
        return value

    def annotation_number(self, meta: Meta, name: str, default: float, low: float, high: float) -> float:
        """A numeric annotation within [low, high], or the default when absent."""
        raw = meta.annotations.get(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not low <= value <= high:
            raise ManifestError(self.where, f"metadata.annotations[{name}]", f"must be a number {low:g}-{high:g}, "
                                f"got {raw!r}")
        return value

    def annotation_duration_ms(self, meta: Meta, name: str, default: int) -> int:
        """A duration annotation ("500ms", "30s", "2m"), at most an hour, in milliseconds."""
        raw = meta.annotations.get(name)
        if raw is None:
            return default
        match = _DURATION.fullmatch(raw.strip())
        ms = round(float(match[1]) * _DURATION_UNITS[match[2]]) if match else -1
        if not 1 <= ms <= 3_600_000:
            raise ManifestError(self.where, f"metadata.annotations[{name}]",
                                f"must be a duration such as 500ms, 30s or 2m, at most 1h, got {raw!r}")
        return ms

    def enum(self, path: str, value: str, allowed: tuple[str, ...]) -> str:
        if value not in allowed:
            raise ManifestError(self.where, path, f"must be one of {', '.join(allowed)}, got {value!r}")
        return value

    def string_map(self, path: str) -> dict[str, str]:
        raw = self.get(path, dict, {})
        for k, v in raw.items():
            if not isinstance(k, str) or not isinstance(v, (str, int, float, bool)):
                raise ManifestError(self.where, f"{path}.{k}", "must map strings to strings")
        return {k: str(v) for k, v in raw.items()}


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", int: "an integer"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def iter_documents(directory: Path) -> Iterator[tuple[str, int, Any]]:
    """(file name, 1-based document number, parsed document) of every YAML file, sorted by name."""
    for path in sorted(p for p in directory.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()):
        rel = str(path.relative_to(directory))
        try:
            docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ManifestError(rel, "", f"is not valid YAML: {exc}") from None
        for index, doc in enumerate(docs, start=1):
            if doc is not None:
                yield rel, index, doc
