"""The controller on a real Kubernetes API server: the seeds applied with the Python client, Pods
whose status the test writes (there is no kubelet), the fleet routing through Envoy from what the
controller watched, status and Events on the objects, and two namespaces with same-named pools."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from redis.asyncio import Redis

from controller.kube_api import PODS, Gone, KubeAPI
from controller.kube_lease import LeaseElector, LeaseSettings
from controller.sources import KubeSettings, KubeSource
from gateway_state.store import StateStore
from local_fleet.fleet import Fleet, FleetSettings
from testbed.kube import KubeAPIServer
from testbed.kube_admin import Kube
from tests.client import QWEN, wait_for
from tests.conftest import BIN, free_port, pod_address
from tests.picker_for_a_gateway import post, round1_round2
from tests.test_resilience import envoy_sends_to_every_picker

EXAMPLE = Path(__file__).parent.parent / "examples" / "fleet"
POOL_V1ALPHA2 = ("inference.networking.x-k8s.io/v1alpha2", "InferencePool")
STRATEGY = "inference.networking.x-k8s.io/routing-strategy"


def manifests_for(namespace: str, net: str, listener_ports: tuple[int, int]) -> dict[str, str]:
    """The example fleet's manifests, its pods moved to `net` and its listeners to `listener_ports`."""
    out = {}
    for path in sorted(EXAMPLE.glob("*.yaml")):
        text = path.read_text().replace("127.0.0.", net).replace("port: 8080", f"port: {listener_ports[0]}")
        out[path.name] = text.replace("port: 8081", f"port: {listener_ports[1]}")
    return out


@pytest.fixture(scope="module")
def two_namespaces(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleet, dict]]:
    """The example's pool, model, Service, Gateway and routes applied in two namespaces, each with its
    own four Pods, and one fleet whose controller watches the API server."""
    spaces = {}
    simulate = tmp_path_factory.mktemp("simulated-pods")
    for i, ns in enumerate(("team-a", "team-b")):
        net = pod_address(f"127.0.{200 + i}.")
        ports = (free_port(), free_port())
        manifests = manifests_for(ns, net, ports)
        kube.namespace(ns)
        for name, text in manifests.items():
            kube.apply_file(Path(name), ns, text)
        kube.pods_from(manifests["pods.yaml"], ns)
        (simulate / f"pods-{ns}.yaml").write_text(manifests["pods.yaml"].replace("name: vllm", f"name: {ns}-vllm")
                                                  + "\n---\n" + _selector_pool(ns))
        spaces[ns] = {"net": net, "ports": ports}
    settings = FleetSettings(
        manifests_dir=simulate, work_dir=tmp_path_factory.mktemp("kube-fleet"), redis_port=free_port(),
        picker_ports=(free_port(), free_port()), picker_metrics_ports=(free_port(), free_port()),
        picker_admin_ports=(),
        envoy_admin_port=free_port(), resync_interval_ms=300, kubeconfig=kube.server.kubeconfig,
        simulator_args=("--time-scale", "0.5"))
    fleet = Fleet(settings)
    try:
        fleet.start()
        yield fleet, spaces
    finally:
        fleet.stop()


def _selector_pool(ns: str) -> str:
    """Only so the local fleet knows which of the listed pods to simulate."""
    return yaml.safe_dump({"apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferencePool",
                           "metadata": {"name": f"simulate-{ns}"},
                           "spec": {"targetPortNumber": 8000,
                                    "selector": {"alibabacloud.com/inference-workload": "vllm-inference"}}})


async def config_of(fleet: Fleet):  # noqa: ANN201 (a Config)
    redis = Redis.from_url(fleet.redis_url)
    try:
        return await StateStore(redis).read_config()
    finally:
        await redis.aclose()


async def test_the_seeds_route_round1_then_round2_to_one_pod_per_namespace(two_namespaces) -> None:
    fleet, spaces = two_namespaces
    config = await config_of(fleet)
    assert set(config.pools) >= {"team-a/qwen-inference-pool", "team-b/qwen-inference-pool"}
    for ns, space in spaces.items():
        pool = config.pools[f"{ns}/qwen-inference-pool"]
        assert {e.address for e in pool.endpoints} == {f"{space['net']}{i}" for i in range(11, 15)}
        first, second = await round1_round2(space["ports"][0])
        assert first == second, f"{ns}: round2 left the pod that holds round1's prefix"
        assert first.startswith(f"{ns}-"), f"{ns} routed outside its own namespace: {first}"


async def test_pool_status_is_accepted_per_gateway(two_namespaces, kube: Kube) -> None:
    def accepted() -> bool:
        pool = kube.get(*POOL_V1ALPHA2, "team-a", "qwen-inference-pool")
        parents = (pool.get("status") or {}).get("parents") or []
        return any(p["parentRef"]["name"] == "inference-gateway"
                   and {c["type"]: c["status"] for c in p["conditions"]} == {"Accepted": "True",
                                                                             "ResolvedRefs": "True"}
                   for p in parents)

    await wait_for(accepted, 10.0)


async def test_a_pod_not_ready_or_being_deleted_leaves_routing_within_a_second(two_namespaces, kube: Kube) -> None:
    fleet, spaces = two_namespaces
    ns, net = "team-a", spaces["team-a"]["net"]

    async def endpoints() -> set[str]:
        return {e.name for e in (await config_of(fleet)).pools[f"{ns}/qwen-inference-pool"].endpoints}

    assert "vllm-qwen-3" in await endpoints()
    started = time.monotonic()
    kube.set_pod_status(ns, "vllm-qwen-3", f"{net}14", ready=False)
    while "vllm-qwen-3" in await endpoints():
        assert time.monotonic() - started < 1.0, "a pod set not Ready stayed routable for over 1 s"
        await asyncio.sleep(0.02)
    print(f"not Ready -> out of routing: {time.monotonic() - started:.3f} s")
    kube.set_pod_status(ns, "vllm-qwen-3", f"{net}14", ready=True)
    await wait_for(lambda: _contains(endpoints(), "vllm-qwen-3"), 2.0)

    # Deletion in progress (held by a finalizer, as a graceful shutdown holds it) means draining.
    kube.core.patch_namespaced_pod("vllm-qwen-3", ns, {"metadata": {"finalizers": ["tests/hold"]}})
    started = time.monotonic()
    kube.core.delete_namespaced_pod("vllm-qwen-3", ns)
    while "vllm-qwen-3" in await endpoints():
        assert time.monotonic() - started < 1.0, "a pod being deleted stayed routable for over 1 s"
        await asyncio.sleep(0.02)
    print(f"deleted -> out of routing: {time.monotonic() - started:.3f} s")
    kube.core.patch_namespaced_pod("vllm-qwen-3", ns, {"metadata": {"finalizers": None}})
    kube.pods_from(yaml.safe_dump({"kind": "Pod", "metadata": {"name": "vllm-qwen-3", "labels": {
        "alibabacloud.com/inference-workload": "vllm-inference"}}, "status": {"podIP": f"{net}14", "conditions": [
            {"type": "Ready", "status": "True"}]}}), ns)
    await wait_for(lambda: _contains(endpoints(), "vllm-qwen-3"), 5.0)


async def _contains(names, name: str) -> bool:  # noqa: ANN001 (an awaitable set)
    return name in await names


async def test_an_invalid_field_is_reported_while_the_last_good_version_serves(two_namespaces, kube: Kube) -> None:
    fleet, spaces = two_namespaces
    ns = "team-b"
    pool = kube.get(*POOL_V1ALPHA2, ns, "qwen-inference-pool")
    annotations = pool["metadata"]["annotations"]
    kube.apply({"apiVersion": POOL_V1ALPHA2[0], "kind": "InferencePool",
                "metadata": {"name": "qwen-inference-pool", "annotations": {**annotations, STRATEGY: "FASTEST"}},
                "spec": pool["spec"]}, ns)

    def condition() -> dict | None:
        status = kube.get(*POOL_V1ALPHA2, ns, "qwen-inference-pool").get("status") or {}
        for parent in status.get("parents") or []:
            for c in parent.get("conditions", []):
                if c["type"] == "Accepted" and c["status"] == "False":
                    return c
        return None

    await wait_for(lambda: condition() is not None, 10.0)
    found = condition()
    assert found is not None and f"metadata.annotations[{STRATEGY}]" in found["message"]
    assert "FASTEST" in found["message"]
    events = [e for e in kube.events(ns) if e.involved_object.name == "qwen-inference-pool"]
    assert any(e.type == "Warning" and STRATEGY in e.message for e in events)
    # The last good version keeps serving: still prefix-aware, still routing.
    config = await config_of(fleet)
    assert config.pools[f"{ns}/qwen-inference-pool"].strategy.value == "PREFIX_CACHE"
    first, second = await round1_round2(spaces[ns]["ports"][0])
    assert first == second and first.startswith(f"{ns}-")

    kube.apply({"apiVersion": POOL_V1ALPHA2[0], "kind": "InferencePool",
                "metadata": {"name": "qwen-inference-pool", "annotations": annotations}, "spec": pool["spec"]}, ns)
    await wait_for(lambda: condition() is None, 10.0)


async def test_the_leader_lease_changes_hands_only_after_it_expires(kube_server: KubeAPIServer) -> None:
    a_api, b_api = await KubeAPI.connect(str(kube_server.kubeconfig)), await KubeAPI.connect(
        str(kube_server.kubeconfig))
    settings = LeaseSettings("default", name="lease-test", duration_s=2, renew_interval_s=0.2)
    a, b = LeaseElector(a_api, settings, "a"), LeaseElector(b_api, settings, "b")
    try:
        assert await a.campaign() and not await b.campaign()
        for _ in range(5):  # a renews; b keeps seeing a fresh record
            await asyncio.sleep(0.5)
            assert await a.campaign() and not await b.campaign()
        started = time.monotonic()
        while not await b.campaign():  # a stops renewing, as a frozen leader would
            await asyncio.sleep(0.1)
        assert 1.9 <= time.monotonic() - started <= 3.5
        assert not await a.campaign()  # a wakes up: the Lease is b's
        lease = await b_api.request("GET", "/apis/coordination.k8s.io/v1/namespaces/default/leases/lease-test")
        assert lease["spec"]["holderIdentity"] == "b" and lease["spec"]["leaseTransitions"] == 1
        await b.release()
        assert await a.campaign()  # released: no need to wait for it to expire
    finally:
        await a_api.close()
        await b_api.close()


async def test_a_watch_past_compacted_history_relists_and_misses_nothing(kube_server: KubeAPIServer,
                                                                       kube: Kube) -> None:
    api = await KubeAPI.connect(str(kube_server.kubeconfig))
    source = KubeSource(api, KubeSettings(watch_timeout_s=1, namespace="relist"), resources=(PODS,))
    kube.namespace("relist")
    await source.start()
    try:
        await wait_for(lambda: source.synced, 10.0)
        for other in ("relist-other", "relist-third"):  # history moves on where this watch sees nothing
            kube.namespace(other)
        kube_server.compact()
        with pytest.raises(Gone):  # what the source's next watch gets: its version is gone
            async for _ in api.watch(PODS, "1", 5):
                pass
        await wait_for(lambda: source.relists >= 1, 10.0)
        kube.create_pod("relist", "after-relist", {"app": "x"}, "127.0.0.9")
        await wait_for(lambda: "Pod relist/after-relist" in source.objects(), 5.0)
        assert source.objects()["Pod relist/after-relist"]["status"]["podIP"] == "127.0.0.9"
    finally:
        await source.stop()
        await api.close()


async def test_a_gateway_pods_renderer_writes_envoys_files_without_leading(two_namespaces, kube: Kube,
                                                                          tmp_path: Path) -> None:
    """The chart's standalone gateway: beside each Envoy, a renderer that only writes Envoy's files."""
    envoy_dir = tmp_path / "envoy"
    log_path = tmp_path / "renderer.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([str(BIN / "controller"), "--kubernetes", "--kubeconfig", str(kube.server.kubeconfig),
                                 "--render-envoy-only", "--envoy-config-dir", str(envoy_dir),
                                 "--redis-url", "redis://127.0.0.1:1/0", "--controller-id", "renderer"],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        await wait_for(lambda: (envoy_dir / "lds.json").exists(), 20.0)
        listeners = {r["name"] for r in json.loads((envoy_dir / "lds.json").read_text())["resources"]}
        assert {"team-a/inference-gateway/http-llm", "team-b/inference-gateway/http-llm"} <= listeners
        clusters = {r["name"] for r in json.loads((envoy_dir / "cds.json").read_text())["resources"]}
        assert {"pool/team-a/qwen-inference-pool", "pool/team-b/qwen-inference-pool"} <= clusters
    finally:
        proc.terminate()
        proc.wait(10)
    text = log_path.read_text()
    assert "Redis" not in text and "lead" not in text, text[-2000:]  # it never tried to publish


@pytest.mark.parametrize("group", ["inference.networking.x-k8s.io", "llm-d.ai"])
async def test_objectives_and_rewrites_are_read_from_both_api_groups(two_namespaces, kube: Kube, group: str) -> None:
    """The seeds' group and the one the llm-d router serves the same kinds from; each object accepted."""
    fleet, _ = two_namespaces
    name = "batch-" + group.split(".")[0]
    kube.apply({"apiVersion": f"{group}/v1alpha2", "kind": "InferenceObjective",
                "metadata": {"name": name, "namespace": "team-a"},
                "spec": {"priority": -3, "poolRef": {"name": "qwen-inference-pool"}}}, "team-a")
    kube.apply({"apiVersion": f"{group}/v1alpha2", "kind": "InferenceModelRewrite",
                "metadata": {"name": name, "namespace": "team-a"},
                "spec": {"poolRef": {"name": "qwen-inference-pool"},
                         "rules": [{"matches": [{"model": {"value": name}}],
                                    "targets": [{"modelRewrite": "/models/Qwen3-32B"}]}]}}, "team-a")

    async def loaded() -> bool:
        config = await config_of(fleet)
        pool = "team-a/qwen-inference-pool"
        objective = config.objectives.get(pool, {}).get(name)
        return objective is not None and objective.priority == -3 and name in config.models.get(pool, {})

    await wait_for(loaded, 10.0)

    def accepted() -> bool:
        conditions = kube.get(f"{group}/v1alpha2", "InferenceObjective", "team-a", name).get("status") or {}
        return any(c["type"] == "Accepted" and c["status"] == "True" for c in conditions.get("conditions", []))

    await wait_for(accepted, 10.0)


@pytest.mark.parametrize("state", ["redis", "local"], ids=["shared", "control-per-replica"])
async def test_both_replicas_send_a_prefix_to_its_pod_only_from_the_shared_index(two_namespaces, state: str) -> None:
    """The rendezvous home off, two replicas (Envoy spreads the streams over them): a prompt one replica
    placed returns to its pod through either only when they share the index. The control runs them on
    per-replica state, where the other replica does not know the prompt: they disagree."""
    fleet, spaces = two_namespaces
    port, pickers = spaces["team-a"]["ports"][0], ("picker-0", "picker-1")
    for name in pickers:
        fleet.restart(name, ("--scheduling", "prefix_home_weight=0", *(("--state", "local") if state == "local"
                                                                      else ())))
    fleet.wait_pickers_routable(30.0)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            # Envoy sends every stream to one replica for a few seconds after a restart (test_resilience).
            await wait_for(lambda: envoy_sends_to_every_picker(http, fleet, port, QWEN), 30.0)
        prompts = [f"team-a conversation {i} " + " ".join(f"w{i}x{j}" for j in range(100)) for i in range(15)]

        async def pods(turn: str) -> list[str]:
            out = []
            for prompt in prompts:
                status, pod, text = await post(port, {"model": QWEN, "max_tokens": 2,
                                                      "messages": [{"role": "user", "content": f"{prompt} {turn}"}]})
                assert status == 200, text
                out.append(pod)
            return out

        # Each prompt twice more: one of the two goes through the replica that did not place it.
        before, after, again = await pods("turn 1"), await pods("turn 2"), await pods("turn 3")
    finally:
        for name in pickers:
            fleet.restart(name)
        fleet.wait_pickers_routable(30.0)
    assert len(set(before)) >= 2, before
    kept = sum(a == b == c for a, b, c in zip(before, after, again, strict=True))
    assert kept == len(prompts) if state == "redis" else kept < len(prompts), (kept, before, after, again)
