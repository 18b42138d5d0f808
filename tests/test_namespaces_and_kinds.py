"""Namespaced identities and the newer inference kinds, from manifests to what the picker resolves:
same-named pools in two namespaces, several target ports, InferenceObjective, InferenceModelRewrite
precedence, and which model names a pool serves."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller import envoy_config
from controller.desired import build
from controller.manifests import ManifestError
from controller.resources import load_directory
from gateway_state.records import Config, FailureMode

POOLS = """
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {name: qwen-inference-pool, namespace: team-a}
spec:
  selector: {matchLabels: {app: qwen}}
  targetPorts: [{number: 8000}, {number: 8001}]
  appProtocol: kubernetes.io/h2c
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferencePool
metadata: {name: qwen-inference-pool, namespace: team-b}
spec:
  selector: {app: qwen}
  targetPortNumber: 8000
---
apiVersion: v1
kind: Pod
metadata: {name: a-0, namespace: team-a, labels: {app: qwen}}
status: {podIP: 10.0.0.1, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b-0, namespace: team-b, labels: {app: qwen}}
status: {podIP: 10.0.1.1, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b-1, namespace: team-b, labels: {app: qwen}, deletionTimestamp: "2026-11-30T12:00:00Z"}
status: {podIP: 10.0.1.2, conditions: [{type: Ready, status: "True"}]}
"""

KINDS = """
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: batch, namespace: team-a}
spec: {priority: -5, poolRef: {name: qwen-inference-pool}}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModelRewrite
metadata: {name: older, namespace: team-a, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  poolRef: {name: qwen-inference-pool}
  rules:
  - matches: [{model: {value: qwen}}]
    targets: [{modelRewrite: qwen-v2, weight: 90}, {modelRewrite: qwen-v3, weight: 10}]
  - targets: [{modelRewrite: qwen-default}]
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModelRewrite
metadata: {name: newer, namespace: team-a, creationTimestamp: "2026-06-01T00:00:00Z"}
spec:
  poolRef: {name: qwen-inference-pool}
  rules:
  - matches: [{model: {value: qwen}}]
    targets: [{modelRewrite: loses-to-the-older}]
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModel
metadata: {name: listed, namespace: team-b}
spec: {modelName: qwen, criticality: Critical, poolRef: {name: qwen-inference-pool}}
"""


def load(tmp_path: Path, text: str) -> tuple[object, object]:
    (tmp_path / "m.yaml").write_text(text)
    manifests = load_directory(tmp_path)
    return manifests, build(manifests)


def test_same_named_pools_in_two_namespaces_stay_apart(tmp_path: Path) -> None:
    manifests, state = load(tmp_path, POOLS)
    a, b = state.pools["team-a/qwen-inference-pool"], state.pools["team-b/qwen-inference-pool"]
    # Several target ports: one endpoint per pod and port, named pod:port.
    assert [(e.name, e.key) for e in a.endpoints] == [("a-0:8000", "10.0.0.1:8000"), ("a-0:8001", "10.0.0.1:8001")]
    # A pod being deleted drains: it takes no new requests.
    assert [e.name for e in b.endpoints] == ["b-0"]
    assert a.failure_mode == FailureMode.FAIL_CLOSE  # the v1 API's default
    assert b.failure_mode == FailureMode.FAIL_OPEN  # as the source documents' v1alpha2 pools ran
    by_name = {c["name"]: c for c in envoy_config.render(manifests, state, envoy_config.EnvoySettings()).clusters}
    assert "typed_extension_protocol_options" in by_name["pool/team-a/qwen-inference-pool"]  # h2c to the pods
    assert "typed_extension_protocol_options" not in by_name["pool/team-b/qwen-inference-pool"]


@pytest.mark.parametrize("group", ["inference.networking.x-k8s.io", "llm-d.ai"])
def test_objectives_rewrites_and_which_models_a_pool_serves(tmp_path: Path, group: str) -> None:
    """As the seeds write them, and as the llm-d router serves the same kinds under its own group."""
    kinds = KINDS
    for kind in ("InferenceObjective", "InferenceModelRewrite"):
        kinds = kinds.replace(f"inference.networking.x-k8s.io/v1alpha2\nkind: {kind}",
                              f"{group}/v1alpha2\nkind: {kind}")
    assert kinds.count(f"{group}/v1alpha2") >= 3
    _, state = load(tmp_path, POOLS + kinds)
    config = Config(1, state.pools, state.models, objectives=state.objectives)
    a, b = config.pools["team-a/qwen-inference-pool"], config.pools["team-b/qwen-inference-pool"]
    assert config.objectives["team-a/qwen-inference-pool"]["batch"].priority == -5
    # Rewrites: an exact match of the oldest resource wins; a rule with no match takes every other name.
    exact = config.model(a, "qwen")
    assert exact is not None and [(t.name, t.weight) for t in exact.targets] == [("qwen-v2", 90), ("qwen-v3", 10)]
    other = config.model(a, "anything")
    assert other is not None and [t.name for t in other.targets] == ["qwen-default"]
    # Once an InferenceModel names a pool, only its models are served there.
    assert b.lists_models and config.model(b, "qwen") is not None and config.model(b, "unknown") is None
    # A pool that lists none serves every name as it is.
    _, bare = load(tmp_path, POOLS)
    open_pool = bare.pools["team-b/qwen-inference-pool"]
    served = Config(1, bare.pools, bare.models).model(open_pool, "any-model")
    assert served is not None and [t.name for t in served.targets] == ["any-model"]


@pytest.mark.parametrize(("text", "field"), [
    (POOLS.replace("[{number: 8000}, {number: 8001}]", "[{number: 8000}, {number: 8000}]"), "spec.targetPorts"),
    (POOLS.replace("appProtocol: kubernetes.io/h2c", "appProtocol: grpc"), "spec.appProtocol"),
    (POOLS + KINDS.replace("priority: -5", "priority: high"), "spec.priority"),
    (POOLS + KINDS.replace("modelRewrite: qwen-default", "modelRewrite: ''"), "targets[0].modelRewrite"),
])
def test_invalid_fields_are_named(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(ManifestError) as raised:
        load(tmp_path, text)
    assert field in str(raised.value)
