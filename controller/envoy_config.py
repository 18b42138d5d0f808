"""Render Envoy's listeners and clusters from Gateways, HTTPRoutes, pools and Services.

Per InferencePool route, the picker (ext_proc) sets `x-gateway-destination-endpoint`
to the chosen endpoint, puts the ordered list (chosen first, then fallbacks) in the
`envoy.lb` dynamic metadata, and clears the route cache; routing then re-matches:
  - header present -> the pool's cluster, whose override-host policy connects to the
    first endpoint of the list; a connection that is refused or reset before any
    response byte is retried on the next one (a response already started never is);
  - header absent (no picker answered) -> the pool's failure mode: FailOpen goes round
    robin over the pool (the same cluster, with no override), FailClose answers an
    OpenAI-shaped 503.
A pool's cluster takes its endpoints from its own EDS file, so pods coming and going
update its hosts without replacing the cluster and its connections. Clients cannot
choose the endpoint themselves: the first filter strips the header.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any

from controller.desired import DesiredState
from controller.manifests import HTTPRouteSpec, Manifests, MirrorSpec, RouteRule
from gateway_state.protocol import (
    DESTINATION_HEADER,
    LB_METADATA_NAMESPACE,
    MIRROR_CLUSTER_HEADER,
    MIRROR_ENDPOINT_HEADER,
    MIRROR_FRACTION_METADATA_KEY,
    MIRROR_POOL_METADATA_KEY,
    POOL_METADATA_KEY,
    POOL_STATS_TAG,
    PREFILL_ENDPOINT_HEADER,
    ROUTING_HEADERS,
    openai_error,
    pool_cluster,
    pool_filter,
    pool_filter_stat_prefix,
)
from gateway_state.records import Endpoint, FailureMode, Pool

# Envoy's response flags for a model server that could not be reached or went away.
UPSTREAM_FAILURE_FLAGS = ("UF", "UH", "URX", "UC", "UR", "UO", "UT", "NR", "DC")
PICKER_CLUSTER = "picker"

T_LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
T_CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
T_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
T_EXT_PROC = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
T_EXT_PROC_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"
T_FILTER_CONFIG = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
T_HEADER_MUTATION = "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation"
T_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
T_HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
T_UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
T_LOAD_ASSIGNMENT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
T_OVERRIDE_HOST = "type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost"
T_ROUND_ROBIN = "type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin"
T_PREVIOUS_HOSTS = "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"


@dataclass(frozen=True)
class EnvoySettings:
    listen_address: str = "0.0.0.0"
    picker_endpoints: tuple[tuple[str, int], ...] = (("127.0.0.1", 9002),)
    # Envoy buffers the whole body for the picker; larger bodies get an OpenAI-shaped 413.
    # 8 MiB holds a 32k-token prompt many times over, and a few inline images.
    max_request_body_bytes: int = 8 * 1024 * 1024
    # Upper bound on one picker answer; decisions take about a millisecond.
    picker_message_timeout_ms: int = 2000
    # The seeds' BackendTrafficPolicy: generation can take an hour.
    request_timeout_s: int = 3600
    # A killed picker replica leaves rotation after two missed checks (0.5 to 1 s).
    picker_health_interval_ms: int = 500
    # Pickers serving TLS (their default, a self-signed certificate): Envoy connects with TLS
    # and does not verify it, as gateways do with endpoint pickers.
    picker_tls: bool = False
    # How many of the picker's fallbacks Envoy tries when the chosen pod refuses or resets
    # the connection before answering (the picker names up to `scheduling.fallbacks`).
    pod_retries: int = 3
    # Where Envoy reads the files the controller writes (pool clusters point at their EDS files).
    config_dir: str = "/etc/envoy"


@dataclass(frozen=True)
class Rendered:
    """Envoy's resources: listeners and clusters, and each pool cluster's endpoints (EDS)."""

    listeners: list[dict[str, Any]]
    clusters: list[dict[str, Any]]
    endpoints: dict[str, dict[str, Any]]  # EDS file name -> its ClusterLoadAssignment


def _duration(ms: int) -> str:
    return f"{ms / 1000:.3f}s"


def _error_json(status: int, message: str, err_type: str) -> str:
    return json.dumps(openai_error(status, message, err_type))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _static_cluster(name: str, hosts: tuple[tuple[str, int], ...], http2: bool = False,
                    lb_policy: str = "ROUND_ROBIN") -> dict[str, Any]:
    # A host name (a Kubernetes Service's) is resolved, and re-resolved, by DNS.
    kind = "STATIC" if all(_is_ip(h) for h, _ in hosts) else "STRICT_DNS"
    cluster: dict[str, Any] = {
        "@type": T_CLUSTER, "name": name, "type": kind, "connect_timeout": "2s", "lb_policy": lb_policy,
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": ip, "port_value": port}}}} for ip, port in hosts
        ]}]},
        # LLM traffic is few, long requests: never let Envoy's defaults (1024 requests,
        # 3 concurrent retries) shed them.
        "circuit_breakers": {"thresholds": [{"max_connections": 100_000, "max_pending_requests": 100_000,
                                             "max_requests": 100_000, "max_retries": 100_000}]},
    }
    if http2:
        cluster["typed_extension_protocol_options"] = _http2_options()
    return cluster


def _http2_options() -> dict[str, Any]:
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": T_HTTP_OPTIONS, "explicit_http_config": {"http2_protocol_options": {}}}}


def _clusters(state: DesiredState, routes: list[HTTPRouteSpec], s: EnvoySettings) -> list[dict[str, Any]]:
    picker = _static_cluster(PICKER_CLUSTER, s.picker_endpoints, http2=True)
    if s.picker_tls:
        picker["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": T_UPSTREAM_TLS, "common_tls_context": {"alpn_protocols": ["h2"]}}}
    picker["health_checks"] = [{
        "timeout": _duration(min(1000, s.picker_health_interval_ms)),
        "interval": _duration(s.picker_health_interval_ms),
        "unhealthy_threshold": 2, "healthy_threshold": 1, "grpc_health_check": {},
        # Envoy does not count ext_proc's gRPC streams as traffic to this cluster, so
        # without these it would check only once a minute.
        "no_traffic_interval": _duration(s.picker_health_interval_ms),
        "no_traffic_healthy_interval": _duration(s.picker_health_interval_ms),
    }]
    # Never send streams to a replica that is not serving, even with most replicas down:
    # with none left, the ext_proc call fails and the pool's failure mode decides.
    picker["common_lb_config"] = {"healthy_panic_threshold": {"value": 0}}
    # A crashed replica refuses connections: eject it on the first refusal instead of
    # waiting for two missed health checks.
    picker["outlier_detection"] = {
        "split_external_local_origin_errors": True, "consecutive_local_origin_failure": 1,
        "enforcing_consecutive_local_origin_failure": 100, "interval": "1s", "base_ejection_time": "5s",
        "max_ejection_percent": 100,
    }
    clusters = [picker]
    mirrored = {m.backend.id for r in routes for rule in r.rules for m in rule.mirrors
                if m.backend.kind == "InferencePool"}
    for pool in sorted(state.pools.values(), key=lambda p: p.name):
        clusters.append(_pool_cluster(pool, s, picker["circuit_breakers"]))
        # The copies' clusters: the same endpoints, the endpoint named by the picker's header.
        if pool.name in mirrored:
            clusters.append(_pool_cluster(pool, s, picker["circuit_breakers"], "mirror", MIRROR_ENDPOINT_HEADER))
        if pool.pd is not None:
            clusters.append(_pool_cluster(pool, s, picker["circuit_breakers"], "prefill", PREFILL_ENDPOINT_HEADER))
    for (name, port), hosts in sorted(state.services.items()):
        clusters.append(_static_cluster(f"service/{name}/{port}", tuple((e.address, e.port) for e in hosts),
                                        lb_policy=state.service_lb.get(name, "ROUND_ROBIN")))
    return clusters


def eds_file(pool: str, side: str = "") -> str:
    """The EDS file of a pool (`namespace/name`), or of one side of an SGLang PD pool: namespaces
    hold no dots and names no '+', so none collide."""
    return "eds-" + pool.replace("/", ".", 1) + (f"+{side}" if side else "") + ".json"


def _sides(pool: Pool) -> dict[str, tuple[Endpoint, ...]]:
    """A pool's endpoint sets by EDS file suffix: all of them, or an SGLang PD pool's decode side
    (its primary cluster: a retry past the picker's list stays on decode pods) and prefill side."""
    if pool.pd is None:
        return {"": pool.endpoints}
    return {"": pool.side("decode"), "prefill": pool.side("prefill")}


def _pool_cluster(pool: Pool, s: EnvoySettings, circuit_breakers: dict[str, Any], role: str = "",
                  endpoint_header: str = "") -> dict[str, Any]:
    """A pool's cluster: the primary one reads the picker's ordered list from the `envoy.lb` metadata
    (round robin without one); a copy's reads its endpoint from a header, which a mirrored request carries."""
    name = pool_cluster(pool.name, role)
    side = "prefill" if role == "prefill" else ""  # a mirror shares the pool's endpoints
    source: dict[str, Any] = {"header": endpoint_header} if endpoint_header else {
        "metadata": {"key": LB_METADATA_NAMESPACE, "path": [{"key": DESTINATION_HEADER}]}}
    cluster: dict[str, Any] = {
        "@type": T_CLUSTER, "name": name, "type": "EDS", "connect_timeout": "2s",
        "eds_cluster_config": {"service_name": pool_cluster(pool.name, side),
                               "eds_config": _file_source(s.config_dir, eds_file(pool.name, side))},
        "load_balancing_policy": {"policies": [{"typed_extension_config": {
            "name": "envoy.load_balancing_policies.override_host", "typed_config": {
                "@type": T_OVERRIDE_HOST, "override_host_sources": [source],
                "fallback_policy": {"policies": [{"typed_extension_config": {
                    "name": "envoy.load_balancing_policies.round_robin", "typed_config": {"@type": T_ROUND_ROBIN}}}]},
            }}}]},
        "circuit_breakers": circuit_breakers,
    }
    if pool.app_protocol == "kubernetes.io/h2c":
        cluster["typed_extension_protocol_options"] = _http2_options()
    return cluster


def _load_assignment(cluster: str, endpoints: tuple[Endpoint, ...]) -> dict[str, Any]:
    return {"@type": T_LOAD_ASSIGNMENT, "cluster_name": cluster, "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": e.address, "port_value": e.port}}}}
        for e in endpoints]}]}


def _match(kind: str, value: str) -> dict[str, Any]:
    if kind == "Exact":
        return {"path": value}
    if value == "/" or value.endswith("/"):
        return {"prefix": value}
    return {"path_separated_prefix": value}  # Gateway API PathPrefix matches whole segments


def _precedence(entry: tuple[str, str, Any]) -> tuple[int, int]:
    kind, value, _ = entry
    return (0 if kind == "Exact" else 1, -len(value))


def _routes_for_rule(rule: RouteRule, state: DesiredState, s: EnvoySettings) -> list[tuple[str, str, Any]]:
    # A Service mirror is Envoy's own (round robin, sampled by Envoy); an InferencePool mirror is
    # placed by the picker, which samples, names the copy's cluster and endpoint, or drops it.
    mirrors: list[dict[str, Any]] = [
        {"cluster": f"service/{m.backend.id}/{m.backend.port}",
         "runtime_fraction": {"default_value": {"numerator": round(m.fraction * 1_000_000), "denominator": "MILLION"}}}
        for m in rule.mirrors if m.backend.kind == "Service"]
    pool_mirror = next((m for m in rule.mirrors if m.backend.kind == "InferencePool"), None)
    out: list[tuple[str, str, Any]] = []
    pool_ref = next((b for b in rule.backends if b.kind == "InferencePool"), None)
    for kind, value in rule.matches:
        match = _match(kind, value)
        if pool_ref is not None:
            out.extend((kind, value, r) for r in _pool_routes(match, state.pools.get(pool_ref.id), pool_ref.id,
                                                             mirrors, pool_mirror, s))
            continue
        services = [b for b in rule.backends if b.weight > 0]
        route: dict[str, Any] = {"match": match}
        if not services:
            route["direct_response"] = {"status": 500, "body": {"inline_string": _error_json(
                500, "The route has no backend.", "InternalServerError")}}
        else:
            action: dict[str, Any] = {"timeout": f"{s.request_timeout_s}s"}
            if len(services) == 1:
                action["cluster"] = f"service/{services[0].id}/{services[0].port}"
            else:
                action["weighted_clusters"] = {"clusters": [
                    {"name": f"service/{b.id}/{b.port}", "weight": b.weight} for b in services]}
            if mirrors:
                action["request_mirror_policies"] = mirrors
            route["route"] = action
        out.append((kind, value, route))
    return out


def _pool_routes(match: dict[str, Any], pool: Pool | None, name: str, mirrors: list[dict[str, Any]],
                 pool_mirror: MirrorSpec | None, s: EnvoySettings) -> list[dict[str, Any]]:
    # An SGLang PD pool cannot fail open: a pod that gets no bootstrap room cannot serve.
    fail_open = pool is None or (pool.failure_mode == FailureMode.FAIL_OPEN and pool.pd is None)
    metadata = [{"key": POOL_METADATA_KEY, "value": name}]
    if pool_mirror is not None:
        metadata += [{"key": MIRROR_POOL_METADATA_KEY, "value": pool_mirror.backend.id},
                     {"key": MIRROR_FRACTION_METADATA_KEY, "value": f"{pool_mirror.fraction:g}"}]
    # The pool's own ext_proc filter, off by default in the chain, runs on the pool's routes only.
    per_filter = {pool_filter(name): {"@type": T_FILTER_CONFIG, "config": {
        "@type": T_EXT_PROC_ROUTE, "overrides": {"grpc_initial_metadata": metadata}}}}
    picked: dict[str, Any] = {"cluster": pool_cluster(name), "timeout": f"{s.request_timeout_s}s"}
    if mirrors:
        picked["request_mirror_policies"] = mirrors
    copies = list(mirrors)
    if pool_mirror is not None:
        copies.append({"cluster_header": MIRROR_CLUSTER_HEADER})
    if pool is not None and pool.pd is not None:
        copies.append({"cluster": pool_cluster(name, "prefill")})
    # The override-host policy takes the next endpoint of the picker's list on each retry. `reset`
    # covers a pod that dies before answering; once response headers have gone to the client,
    # Envoy never retries.
    retry = {"retry_on": "connect-failure,refused-stream,reset", "num_retries": s.pod_retries}
    routed_action = {**picked, "retry_policy": retry}
    if copies:
        routed_action["request_mirror_policies"] = copies
    routed = {"match": {**match, "headers": [{"name": DESTINATION_HEADER, "present_match": True}]},
              "route": routed_action, "typed_per_filter_config": per_filter}
    if fail_open:
        fallback: dict[str, Any] = {"match": match, "route": picked, "typed_per_filter_config": per_filter}
    else:
        fallback = {"match": match, "typed_per_filter_config": per_filter,
                    "direct_response": {"status": 503, "body": {"inline_string": _error_json(
                        503, f"No endpoint could be picked in pool {name}.", "ServiceUnavailableError")}},
                    "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}]}
    return [routed, fallback]


def _virtual_hosts(routes: list[HTTPRouteSpec], state: DesiredState, s: EnvoySettings) -> list[dict[str, Any]]:
    """One virtual host per hostname; routes without hostnames apply to every host."""
    by_host: dict[str, list[tuple[str, str, Any]]] = {"*": []}
    for route in routes:
        entries = [e for rule in route.rules for e in _routes_for_rule(rule, state, s)]
        for host in route.hostnames or ("*",):
            by_host.setdefault(host, []).extend(entries)
    for host in by_host:
        if host != "*":
            by_host[host].extend(by_host["*"])
    return [{"name": host, "domains": [host], "routes": [r for _, _, r in sorted(entries, key=_precedence)],
             "response_headers_to_add": [SERVED_BY]}
            for host, entries in sorted(by_host.items())]


# Every answer names the endpoint (ip:port) that served it, after any retry: which pod a request reached,
# whatever the engine (left out of answers no pod gave: the gateway's own errors).
SERVED_BY = {"header": {"key": "x-inference-endpoint", "value": "%UPSTREAM_HOST%"},
             "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}


# A stream that cannot reach a replica (a crashed one refuses the connection before the health
# checks notice) opens on another replica instead of falling to the failure mode: only the
# streams a replica was serving when it died are lost.
_PICKER_RETRY = {
    "retry_on": "connect-failure,refused-stream,reset-before-request", "num_retries": 2,
    "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
                              "typed_config": {"@type": T_PREVIOUS_HOSTS}}],
    "host_selection_retry_max_attempts": 3,
}


def _longest_queue_ttl_ms(state: DesiredState) -> int:
    """How long any request may wait in flow control's queue for room (pool or model setting)."""
    pools = state.pools.values()
    models = [m for listed in state.models.values() for m in listed.values()]
    return max([p.flow.queue_ttl_ms for p in pools] + [m.queue_ttl_ms for m in models] + [0])


def _listener(gateway: str, listener: str, port: int, routes: list[HTTPRouteSpec], state: DesiredState,
              s: EnvoySettings) -> dict[str, Any]:
    name = f"{gateway}/{listener}"
    filters: list[dict[str, Any]] = [{"name": "envoy.filters.http.header_mutation", "typed_config": {
        "@type": T_HEADER_MUTATION, "mutations": {"request_mutations": [{"remove": h} for h in ROUTING_HEADERS]}}}]
    pools = sorted({b.id for r in routes for rule in r.rules for b in rule.backends if b.kind == "InferencePool"})
    # One ext_proc filter per pool, so that Envoy counts each pool's picker calls apart (POOL_STATS_TAG).
    filters.extend({"name": pool_filter(pool), "disabled": True, "typed_config": {
        "@type": T_EXT_PROC, "stat_prefix": pool_filter_stat_prefix(pool),
        "grpc_service": {"envoy_grpc": {"cluster_name": PICKER_CLUSTER}, "retry_policy": _PICKER_RETRY},
        # A failed picker call continues without a destination; the route without
        # one then applies the pool's failure mode (round robin, or an OpenAI 503).
        "failure_mode_allow": True,
        "processing_mode": {"request_header_mode": "SEND", "response_header_mode": "SKIP",
                            "request_body_mode": "BUFFERED", "response_body_mode": "NONE",
                            "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP"},
        # A request may wait in the pickers' queue for room: the answer may take its whole TTL.
        "message_timeout": _duration(s.picker_message_timeout_ms + _longest_queue_ttl_ms(state)),
        "mutation_rules": {"allow_all_routing": True},
        # The picker's ordered endpoint list, which the pool cluster's override-host policy reads.
        "metadata_options": {"receiving_namespaces": {"untyped": [LB_METADATA_NAMESPACE]}},
    }} for pool in pools)
    filters.append({"name": "envoy.filters.http.router", "typed_config": {"@type": T_ROUTER}})
    too_large = _error_json(413, f"Request body exceeds the gateway limit of {s.max_request_body_bytes} bytes.",
                            "BadRequestError")
    hcm = {
        "@type": T_HCM, "stat_prefix": name.replace("/", "_"), "codec_type": "AUTO",
        "route_config": {"name": name, "virtual_hosts": _virtual_hosts(routes, state, s)},
        "http_filters": filters,
        "stream_idle_timeout": _duration(max(300_000, _longest_queue_ttl_ms(state) + 60_000)),
        # Envoy's own answers (an over-limit body; a pod that refuses or resets the
        # connection) are OpenAI-shaped too. The picker's answers carry no response flag.
        "local_reply_config": {"mappers": [{
            "filter": {"status_code_filter": {"comparison": {"op": "EQ", "value": {
                "default_value": 413, "runtime_key": "gateway.too_large"}}}},
            "body": {"inline_string": too_large},
            "body_format_override": {"text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"},
                                     "content_type": "application/json"},
        }, {
            "filter": {"response_flag_filter": {"flags": list(UPSTREAM_FAILURE_FLAGS)}},
            "body_format_override": {"json_format": {"error": {
                "message": "The model server did not answer: %LOCAL_REPLY_BODY%",
                "type": "ServiceUnavailableError", "param": None, "code": "%RESPONSE_CODE%"}}},
        }]},
    }
    return {
        "@type": T_LISTENER, "name": name,
        "address": {"socket_address": {"address": s.listen_address, "port_value": port}},
        "per_connection_buffer_limit_bytes": s.max_request_body_bytes,
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}]}],
    }


def render(m: Manifests, state: DesiredState, s: EnvoySettings) -> Rendered:
    listeners = []
    for gateway in sorted(m.gateways, key=lambda g: g.meta.id):
        for listener in gateway.listeners:
            attached = [r for r in m.routes
                        if any(g == gateway.meta.id and section in (None, listener.name) for g, section in r.parents)]
            listeners.append(_listener(gateway.meta.id, listener.name, listener.port, attached, state, s))
    endpoints = {eds_file(p.name, side): _load_assignment(pool_cluster(p.name, side), members)
                 for p in state.pools.values() for side, members in _sides(p).items()}
    return Rendered(listeners, _clusters(state, m.routes, s), endpoints)


def _file_source(config_dir: str, file: str) -> dict[str, Any]:
    return {"path_config_source": {"path": f"{config_dir}/{file}", "watched_directory": {"path": config_dir}},
            "resource_api_version": "V3"}


ADMIN_CLUSTER = "envoy-admin"
T_HEALTH_CHECK = "type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck"


def _health_listener(address: str, port: int, admin_address: str, admin_port: int) -> dict[str, Any]:
    """A listener for the platform, apart from the traffic's: `/ready` answers 200 only while some picker
    passes Envoy's health checks (a gateway pod's startup probe), `/live` is Envoy's own readiness, and
    `/stats/prometheus` Envoy's Prometheus page, read-only, for the collectors and Prometheus (the admin
    port itself stays on loopback)."""
    ready = {"name": "envoy.filters.http.health_check", "typed_config": {
        "@type": T_HEALTH_CHECK, "pass_through_mode": False,
        "headers": [{"name": ":path", "string_match": {"exact": "/ready"}}],
        # Below 1% healthy (no picker at all), or before the picker cluster exists: 503.
        "cluster_min_healthy_percentages": {PICKER_CLUSTER: {"value": 1.0}}}}
    routes = [{"match": {"path": "/stats/prometheus"}, "route": {"cluster": ADMIN_CLUSTER}},
              # Envoy's own readiness (initialized, not draining), for a readiness probe.
              {"match": {"path": "/live"}, "route": {"cluster": ADMIN_CLUSTER, "prefix_rewrite": "/ready"}},
              {"match": {"prefix": "/"}, "direct_response": {"status": 404}}]
    hcm = {"@type": T_HCM, "stat_prefix": "gateway_health", "codec_type": "AUTO",
           "route_config": {"name": "gateway-health", "virtual_hosts": [
               {"name": "gateway-health", "domains": ["*"], "routes": routes}]},
           "http_filters": [ready, {"name": "envoy.filters.http.router", "typed_config": {"@type": T_ROUTER}}]}
    return {"name": "gateway-health", "address": {"socket_address": {"address": address, "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}]}


def bootstrap(config_dir: str, admin_address: str, admin_port: int, health_address: str = "127.0.0.1",
              health_port: int = 0) -> dict[str, Any]:
    """Envoy's static bootstrap: listeners and clusters come from files the controller rewrites; with a
    `health_port`, also the platform's listener (see _health_listener)."""
    static: dict[str, Any] = {}
    if health_port:
        static = {"listeners": [_health_listener(health_address, health_port, admin_address, admin_port)],
                  "clusters": [{k: v for k, v in _static_cluster(ADMIN_CLUSTER, ((admin_address, admin_port),)).items()
                                if k != "@type"}]}  # a bootstrap's resources are typed by their place
    return {
        "node": {"id": "inference-gateway", "cluster": "inference-gateway"},
        "admin": {"address": {"socket_address": {"address": admin_address, "port_value": admin_port}}},
        # Each pool's ext_proc counters carry the pool as a tag: `http.<listener>.ext_proc.inference_pool.
        # <namespace/name>.<counter>` reads `envoy_http_ext_proc_<counter>{inference_pool="namespace/name"}`.
        "stats_config": {"stats_tags": [{
            "tag_name": POOL_STATS_TAG,
            "regex": r"^http\.[^.]+\.ext_proc\.(" + POOL_STATS_TAG + r"\.(.+)\.)[a-z_]+$"}]},
        "static_resources": static,
        "dynamic_resources": {"lds_config": _file_source(config_dir, "lds.json"),
                              "cds_config": _file_source(config_dir, "cds.json")},
    }
