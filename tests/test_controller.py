"""Manifests: every seed loads unchanged, errors name file, document and field, and Envoy accepts the config."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from controller import envoy_config
from controller.desired import build
from controller.manifests import ManifestError
from controller.resources import load_directory
from controller.selectors import LabelSelector, requirement
from gateway_state.records import FailureMode, Runtime, Strategy
from tests.conftest import FIXTURES

SEEDS = sorted((FIXTURES / "seeds").glob("*.yaml"))
ENVOY = str(Path(sys.executable).parent / "envoy")


def one_file(tmp_path: Path, text: str, name: str = "m.yaml") -> Path:
    (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize("seed", SEEDS, ids=[s.name for s in SEEDS])
def test_every_seed_manifest_loads_unchanged(seed: Path, tmp_path: Path) -> None:
    shutil.copy(seed, tmp_path / seed.name)
    manifests = load_directory(tmp_path)
    state = build(manifests)
    # The strategy each pool declares, read from the documents as written: its routing-strategy annotation,
    # or an InferenceTrafficPolicy with a prefixCache profile naming it; DEFAULT otherwise.
    docs = [d for d in yaml.safe_load_all(seed.read_text()) if d]
    prefix_policies = {d["spec"]["poolRef"]["name"] for d in docs
                       if d["kind"] == "InferenceTrafficPolicy" and "prefixCache" in json.dumps(d["spec"])}
    declared = {f"{d['metadata'].get('namespace', 'default')}/{d['metadata']['name']}": Strategy(
        (d["metadata"].get("annotations") or {}).get("inference.networking.x-k8s.io/routing-strategy")
        or ("PREFIX_CACHE" if d["metadata"]["name"] in prefix_policies else "DEFAULT"))
        for d in docs if d["kind"] == "InferencePool"}
    assert {spec.meta.id for spec in manifests.pools} == set(declared)
    for spec in manifests.pools:
        assert spec.target_ports == (8000,)
        assert state.pools[spec.meta.id].strategy == declared[spec.meta.id], spec.meta.id


def test_seed_annotations_and_traffic_policies_take_effect(tmp_path: Path) -> None:
    for name in ("seed000_07.yaml", "seed000_10.yaml"):  # SGLang PREFIX_CACHE pool; PD policy with prefixCache
        shutil.copy(FIXTURES / "seeds" / name, tmp_path / name)
        state = build(load_directory(tmp_path))
        pool = state.pools["default/qwen-inference-pool"]
        assert (pool.strategy, pool.runtime) == (Strategy.PREFIX_CACHE, Runtime.SGLANG)
        (tmp_path / name).unlink()
    shutil.copy(FIXTURES / "seeds" / "seed000_10.yaml", tmp_path / "pd.yaml")
    pd = build(load_directory(tmp_path)).pools["default/qwen-inference-pool"].pd
    assert pd is not None and pd.role_label == "rolebasedgroup.workloads.x-k8s.io/role" and pd.bootstrap_port == 34000


def test_seed_gateway_renders_two_listeners_and_warns_about_the_undeclared_service(tmp_path: Path) -> None:
    for name in ("seed002_01.yaml", "seed002_02.yaml"):
        shutil.copy(FIXTURES / "seeds" / name, tmp_path / name)
    manifests = load_directory(tmp_path)
    state = build(manifests)
    assert any("Service 'default/qwen' port 8000 is not declared" in w for w in state.warnings)
    rendered = envoy_config.render(manifests, state, envoy_config.EnvoySettings())
    assert sorted(lst["address"]["socket_address"]["port_value"] for lst in rendered.listeners) == [8080, 8081]
    names = {c["name"] for c in rendered.clusters}
    assert {"picker", "pool/default/vllm-qwen-pool"} <= names
    assert list(rendered.endpoints) == ["eds-default.vllm-qwen-pool.json"]
    assert "BackendTrafficPolicy" in " ".join(manifests.ignored)


@pytest.mark.parametrize(("text", "expected"), [
    ("apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferencePool\nmetadata: {name: p}\n"
     "spec: {selector: {app: x}, targetPortNumber: 70000}",
     "m.yaml document 1 (InferencePool p): spec.targetPortNumber: must be a port number 1-65535, got 70000"),
    ("apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferencePool\nmetadata:\n  name: p\n"
     "  annotations: {inference.networking.x-k8s.io/routing-strategy: FASTEST}\n"
     "spec: {selector: {app: x}, targetPortNumber: 8000}",
     "metadata.annotations[inference.networking.x-k8s.io/routing-strategy]: must be one of DEFAULT, PREFIX_CACHE"),
    ("kind: Pod\nmetadata: {name: x}\n---\napiVersion: inference.networking.x-k8s.io/v1alpha2\n"
     "kind: InferenceModel\nmetadata: {name: m}\nspec: {modelName: m, poolRef: {name: p}, criticality: Urgent}",
     "m.yaml document 1: apiVersion: is required"),
    ("---\napiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceModel\nmetadata: {name: m}\n"
     "spec: {modelName: m, poolRef: {name: p}, targetModels: [{name: a, weight: -1}]}",
     "m.yaml document 1 (InferenceModel m): spec.targetModels[0].weight: must be between 0 and 1000000"),
    ("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\n"
     "spec: {rules: [{backendRefs: [{kind: Service, name: s}]}]}",
     "m.yaml document 1 (HTTPRoute r): spec.rules[0].backendRefs[0].port: is required for a Service backend"),
    ("key: [unclosed", "m.yaml: is not valid YAML"),
])
def test_invalid_manifests_name_the_file_document_and_field(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ManifestError) as exc:
        load_directory(one_file(tmp_path, text))
    assert expected in str(exc.value)


def test_selectors_match_as_kubernetes_does() -> None:
    sel = LabelSelector((("app", "x"),), (requirement("tier", "In", ["a", "b"]),
                                          requirement("canary", "DoesNotExist", []),
                                          requirement("zone", "NotIn", ["z1"])))
    assert sel.matches({"app": "x", "tier": "a"})
    assert sel.matches({"app": "x", "tier": "b", "zone": "z2"})
    assert not sel.matches({"app": "x", "tier": "c"})
    assert not sel.matches({"app": "x", "tier": "a", "canary": "yes"})
    assert not sel.matches({"app": "x", "tier": "a", "zone": "z1"})
    assert not sel.matches({"tier": "a"})
    assert LabelSelector().matches({"anything": "goes"})
    with pytest.raises(ValueError):
        requirement("k", "Exists", ["v"])


def test_pods_join_pools_by_selector_readiness_and_namespace(tmp_path: Path) -> None:
    shutil.copy(FIXTURES / "fleet" / "pods.yaml", tmp_path / "pods.yaml")
    shutil.copy(FIXTURES / "fleet" / "pools.yaml", tmp_path / "pools.yaml")
    state = build(load_directory(tmp_path))
    prefix = state.pools["default/prefix-pool"]
    assert [e.name for e in prefix.endpoints] == [f"prefix-{i}" for i in range(4)]  # not prefix-unready
    assert state.pools["default/default-pool"].failure_mode == FailureMode.FAIL_OPEN
    assert [t.name for t in state.models["default/default-pool"]["qwen-canary"].targets] == ["adapter-a", "adapter-b"]
    assert [e.key for e in state.services[("default/mirror-svc", 8000)]] == ["127.0.3.1:8000"]


def _static_bootstrap(listeners: list[dict], clusters: list[dict]) -> dict:
    def strip(resource: dict) -> dict:
        return {k: v for k, v in resource.items() if k != "@type"}

    return {"node": {"id": "validate", "cluster": "validate"},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
            "static_resources": {"listeners": [strip(r) for r in listeners], "clusters": [strip(r) for r in clusters]}}


@pytest.mark.parametrize("directory", ["fleet", "seeds-combined", "chart-standalone"])
def test_envoy_accepts_the_rendered_config(directory: str, tmp_path: Path) -> None:
    manifests_dir = tmp_path / "m"
    manifests_dir.mkdir()
    # The chart's standalone gateway: pickers by Service name, over TLS.
    settings = envoy_config.EnvoySettings(picker_endpoints=(("picker.inference.svc", 9002),), picker_tls=True,
                                          config_dir=str(tmp_path)) \
        if directory == "chart-standalone" else envoy_config.EnvoySettings(
            picker_endpoints=(("127.0.0.1", 9002), ("127.0.0.1", 9003)), config_dir=str(tmp_path))
    if directory in ("fleet", "chart-standalone"):
        for path in (FIXTURES / "fleet").glob("*.yaml"):
            shutil.copy(path, manifests_dir / path.name)
    else:  # seed 003's mirroring gateway, with its pool, model and Service
        for name in ("seed003_02.yaml", "seed003_03.yaml"):
            shutil.copy(FIXTURES / "seeds" / name, manifests_dir / name)
    manifests = load_directory(manifests_dir)
    rendered = envoy_config.render(manifests, build(manifests), settings)
    listeners, clusters = rendered.listeners, rendered.clusters
    for name, assignment in rendered.endpoints.items():
        (tmp_path / name).write_text(json.dumps({"resources": [assignment]}))
    picker = next(c for c in clusters if c["name"] == "picker")
    assert (picker["type"], "transport_socket" in picker) == (
        ("STRICT_DNS", True) if directory == "chart-standalone" else ("STATIC", False))
    config = tmp_path / "envoy.json"
    config.write_text(json.dumps(_static_bootstrap(listeners, clusters)))
    result = subprocess.run([ENVOY, "--mode", "validate", "-c", str(config)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_a_service_annotation_picks_envoys_load_balancing_policy(tmp_path: Path) -> None:
    one_file(tmp_path, """
apiVersion: v1
kind: Service
metadata:
  name: least
  annotations: {inference-gateway.io/lb-policy: LEAST_REQUEST}
spec: {selector: {app: x}, ports: [{port: 8000}]}
---
apiVersion: v1
kind: Service
metadata: {name: plain}
spec: {selector: {app: x}, ports: [{port: 8000}]}
""")
    manifests = load_directory(tmp_path)
    clusters = envoy_config.render(manifests, build(manifests), envoy_config.EnvoySettings()).clusters
    policies = {c["name"]: c["lb_policy"] for c in clusters if "lb_policy" in c}
    assert policies["service/default/least/8000"] == "LEAST_REQUEST"
    assert policies["service/default/plain/8000"] == "ROUND_ROBIN"
    one_file(tmp_path, "apiVersion: v1\nkind: Service\nmetadata:\n  name: bad\n"
                       "  annotations: {inference-gateway.io/lb-policy: FASTEST}\nspec: {ports: []}\n", "n.yaml")
    with pytest.raises(ManifestError, match="lb-policy"):
        load_directory(tmp_path)
