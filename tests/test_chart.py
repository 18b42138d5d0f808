"""The Helm chart: linted and rendered by the real Helm engine for every combination of its switches,
each rendered manifest validated by kubernetes-validate (strict) and accepted by a real API server in a
server-side dry run, no wildcard in its RBAC, and the controller running under the chart's own
ServiceAccount against the RBAC-enabled server."""

from __future__ import annotations

import asyncio
import functools
import itertools
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from redis.asyncio import Redis

from gateway_state.store import StateStore
from testbed.kube_admin import Kube
from tests.client import wait_for
from tests.conftest import BIN

CHART = Path(__file__).parent.parent / "charts" / "inference-picker-fleet"
KUBE_VERSION = "1.35.0"  # a current release kubernetes-validate knows
RELEASE, NAMESPACE = "fleet", "inference"
MONITORING_CRDS = Path(__file__).parent / "fixtures" / "kube" / "monitoring-crds.yaml"

# Every switch the chart has, each both ways.
SWITCHES: dict[str, list[dict[str, Any]]] = {
    "redis": [{"redis": {"mode": "bundled"}}, {"redis": {"mode": "bundled", "bundled": {"sentinel": True}}},
              {"redis": {"mode": "external", "external": {"existingSecret": "redis-credentials"}}}],
    "standalone": [{}, {"standalone": {"enabled": True}}],
    "example": [{}, {"example": {"enabled": True}}],
    "monitoring": [{}, {"monitoring": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
                                       "grafanaDashboard": {"enabled": True}}}],
    "autoscaling": [{}, {"picker": {"autoscaling": {"enabled": True}}}],
    "scope": [{}, {"controller": {"watchNamespace": NAMESPACE}}],
    "serving": [{}, {"picker": {"secureServing": False, "admin": {"tokensSecret": "admin-tokens"},
                                "tokenizers": [{"model": "qwen", "path": "/models/qwen.gguf"},
                                               {"path": "/models/default.gguf"}],
                                "modelVolume": {"persistentVolumeClaim": {"claimName": "models"}}},
                     "redis": {"bundled": {"persistence": {"enabled": True}}}}],
}


def merge(*parts: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


COMBINATIONS = [merge(*combo) for combo in itertools.product(*SWITCHES.values())]


@functools.cache
def chart() -> helm.Chart:
    return helm.Chart.load(CHART)


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    rendered = chart().render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [doc for path, text in sorted(rendered.items()) if path.endswith(".yaml")
            for doc in yaml.load_all(text, Loader=yaml.CSafeLoader) if doc]


@functools.cache
def rendered_combinations() -> list[list[dict[str, Any]]]:
    """Every combination, rendered once for the tests that read them all."""
    return [render(values) for values in COMBINATIONS]


@functools.cache
def _validate(text: str) -> None:
    doc = yaml.safe_load(text)
    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_lint_is_clean_for_every_combination() -> None:
    for values in COMBINATIONS:
        report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
        problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        assert not problems, (values, problems)


def test_every_combination_renders_and_validates_strictly() -> None:
    kinds: set[str] = set()
    for docs in rendered_combinations():
        for doc in docs:
            kinds.add(doc["kind"])
            if doc["apiVersion"].split("/")[0].endswith((".k8s.io", ".x-k8s.io", "coreos.com", "alibabacloud.com")) \
                    and "rbac" not in doc["apiVersion"]:
                continue  # custom resources: the API server's dry run checks them against their CRDs
            _validate(yaml.safe_dump(doc, sort_keys=True))
    assert {"Deployment", "StatefulSet", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ClusterRole",
            "Role", "ServiceAccount", "InferencePool", "HTTPRoute", "ServiceMonitor", "PrometheusRule"} <= kinds


def test_the_values_schema_rejects_what_the_chart_cannot_run() -> None:
    for bad in ({"picker": {"replicas": 0}}, {"redis": {"mode": "elsewhere"}}, {"picker": {"grpcPort": 70000}},
                {"picker": {"unknownSetting": 1}}):
        with pytest.raises(helm.HelmError):
            chart().validate_schema(merge(chart().values, bad))
    with pytest.raises(helm.HelmError, match="existingSecret"):
        render({"redis": {"mode": "external"}})


def test_rbac_grants_no_wildcard_and_nothing_to_pickers_or_collectors() -> None:
    for docs in rendered_combinations():
        for doc in docs:
            if doc["kind"] in ("Role", "ClusterRole"):
                for rule in doc["rules"]:
                    for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                        assert "*" not in rule.get(field, []), (doc["metadata"]["name"], rule)
                    assert not set(rule["verbs"]) & {"delete", "deletecollection", "escalate", "bind", "impersonate"}
            if doc["kind"] in ("RoleBinding", "ClusterRoleBinding"):
                assert all(s["name"].endswith(("-controller", "-gateway")) for s in doc["subjects"])
            if doc["kind"] == "Deployment" and doc["metadata"]["name"].endswith(("-picker", "-collector")):
                assert doc["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_the_picker_deployment_is_highly_available() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in render({"example": {"enabled": True}})}
    picker = docs[("Deployment", f"{RELEASE}-picker")]["spec"]
    assert picker["replicas"] >= 2 and picker["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = picker["template"]["spec"]
    assert {c["topologyKey"] for c in pod["topologySpreadConstraints"]} == {"kubernetes.io/hostname",
                                                                           "topology.kubernetes.io/zone"}
    container = pod["containers"][0]
    assert container["readinessProbe"]["grpc"] == {"port": 9003, "service": "readiness"}
    # The pod's grace period covers the picker's drain and its streams' grace.
    assert "--drain-ms=2000" in container["args"] and "--shutdown-grace-ms=30000" in container["args"]
    assert pod["terminationGracePeriodSeconds"] == 2 + 30 + 5
    assert "--pool-name=qwen-inference-pool" in container["args"] and "--secure-serving" in container["args"]
    assert docs[("PodDisruptionBudget", f"{RELEASE}-picker")]["spec"]["minAvailable"] == 1
    controller = docs[("Deployment", f"{RELEASE}-controller")]["spec"]
    assert controller["replicas"] == 2 and "--kubernetes" in controller["template"]["spec"]["containers"][0]["args"]


@pytest.fixture(scope="module")
def chart_namespace(kube: Kube) -> Kube:
    kube.namespace(NAMESPACE)
    kube.install_crds([MONITORING_CRDS])
    return kube


def test_every_combination_is_accepted_by_the_api_server_in_a_dry_run(chart_namespace: Kube) -> None:
    kube = chart_namespace
    seen: set[str] = set()
    for docs in rendered_combinations():
        for doc in docs:
            key = yaml.safe_dump(doc, sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            resource = kube.resource(doc["apiVersion"], doc["kind"])
            namespace = doc["metadata"].get("namespace") if resource.namespaced else None
            resource.create(body=doc, namespace=namespace, query_params=[("dryRun", "All"),
                                                                         ("fieldValidation", "Strict")])


def _apply_rbac(kube: Kube, values: dict[str, Any]) -> None:
    """Create the chart's ServiceAccounts, roles and bindings for real."""
    for doc in render(values):
        if doc["kind"] in ("ServiceAccount", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"):
            kube.apply(doc)


# Namespace-scoped first: the cluster-wide roles of the second would grant the first too.
@pytest.mark.parametrize("scope", ["one namespace", "cluster"])
async def test_the_controller_runs_with_only_the_charts_rbac(chart_namespace: Kube, tmp_path: Path,
                                                             redis_url: str, scope: str) -> None:
    kube = chart_namespace
    scoped = scope == "one namespace"
    _apply_rbac(kube, {"controller": {"watchNamespace": NAMESPACE}} if scoped else {})
    token = kube.core.create_namespaced_service_account_token(
        f"{RELEASE}-controller", NAMESPACE, {"spec": {"expirationSeconds": 3600}}).status.token
    kubeconfig = kube.server.token_kubeconfig(tmp_path / "controller.kubeconfig", token)
    pool_name = "rbac-namespaced" if scoped else "rbac-cluster"  # each run's own pool, status and config
    kube.apply({"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
                "metadata": {"name": pool_name},
                "spec": {"selector": {"matchLabels": {"app": "rbac"}}, "targetPorts": [{"number": 8000}]}},
               NAMESPACE)
    if not kube.core.list_namespaced_pod(NAMESPACE, field_selector="metadata.name=rbac-pod").items:
        kube.create_pod(NAMESPACE, "rbac-pod", {"app": "rbac"}, "127.0.0.77")
    log_path = tmp_path / "controller.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([str(BIN / "controller"), "--kubernetes", "--kubeconfig", str(kubeconfig),
                                 "--lease-namespace", NAMESPACE, "--redis-url", redis_url, "--controller-id", "rbac",
                                 "--resync-interval-ms", "200",
                                 *(["--watch-namespace", NAMESPACE] if scoped else [])],
                                stdout=log, stderr=subprocess.STDOUT)
    redis = Redis.from_url(redis_url)
    try:
        async def published() -> bool:
            config = await StateStore(redis).read_config()
            pool = config.pools.get(f"{NAMESPACE}/{pool_name}") if config else None
            return pool is not None and [e.key for e in pool.endpoints] == ["127.0.0.77:8000"]

        await wait_for(published, 20.0)

        def status_written() -> bool:
            pool = kube.get("inference.networking.k8s.io/v1", "InferencePool", NAMESPACE, pool_name)
            return bool((pool.get("status") or {}).get("parents"))

        await wait_for(status_written, 10.0)
        leases = kube.dynamic.resources.get(api_version="coordination.k8s.io/v1", kind="Lease")
        await wait_for(lambda: leases.get(name="inference-picker-fleet-controller",
                                          namespace=NAMESPACE).spec.holderIdentity == "rbac", 10.0)
        await asyncio.sleep(1.0)
        text = log_path.read_text()
        assert "(403)" not in text and "forbidden" not in text.lower(), text[-3000:]  # ApiException: (403)
    finally:
        proc.terminate()
        proc.wait(10)
        await redis.aclose()


def test_the_collectors_read_every_gateway_replica_and_the_listed_gateways() -> None:
    from collector.main import parse_settings

    external = {"name": "eg", "url": "http://eg-stats.envoy-gateway-system.svc:19001/stats/prometheus",
                "listeners": {"http-10080": f"{NAMESPACE}/qwen-inference-pool"}}
    docs = render({"standalone": {"enabled": True}, "collector": {"gatewayStats": [external]}})
    for doc in docs:
        _validate(yaml.safe_dump(doc))
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    collector = next(d for (kind, name), d in by_name.items() if kind == "Deployment" and name.endswith("-collector"))
    args = collector["spec"]["template"]["spec"]["containers"][0]["args"]
    _, settings = parse_settings(args)
    targets = {t.name: t for t in settings.gateway_targets}
    assert targets["eg"].listeners == {"http-10080": f"{NAMESPACE}/qwen-inference-pool"}
    # The standalone gateway's replicas, ready or not, through a headless Service on their platform port.
    stats_host = targets["standalone"].url.split("//")[1].split(".")[0]
    stats = by_name[("Service", stats_host)]["spec"]
    assert stats["clusterIP"] == "None" and stats["publishNotReadyAddresses"] is True
    gateway = next(d for (kind, name), d in by_name.items() if kind == "Deployment" and name.endswith("-gateway"))
    renderer, envoy = gateway["spec"]["template"]["spec"]["containers"]
    assert "--envoy-health-port=9902" in renderer["args"] and stats["ports"][0]["port"] == 9902
    # Traffic only once a picker routes; after that Envoy's own readiness, so a picker outage leaves the
    # pools' failure modes to apply.
    assert envoy["startupProbe"]["httpGet"] == {"path": "/ready", "port": "health"}
    assert envoy["readinessProbe"]["httpGet"] == {"path": "/live", "port": "health"}


def test_the_pickers_get_each_models_tokenizer_from_the_mounted_volume() -> None:
    values = {"picker": {"tokenizers": [{"model": "qwen", "path": "/models/qwen.gguf"}, {"path": "/models/any.gguf"}],
                         "modelVolume": {"persistentVolumeClaim": {"claimName": "models"}}}}
    picker = next(d for d in render(values) if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("picker"))
    spec = picker["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert {"--tokenizer=qwen=/models/qwen.gguf", "--tokenizer=/models/any.gguf"} <= set(container["args"])
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "models"}} in spec["volumes"]
