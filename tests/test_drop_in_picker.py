"""The picker as a drop-in endpoint picker for a standard gateway: a real Envoy configured the way Envoy AI
Gateway configures an InferencePool backend (ext_proc with FULL_DUPLEX_STREAMED bodies both ways, trailers
SEND, a 300 s message timeout, no fail-open, TLS to the picker without verification, an ORIGINAL_DST
cluster reading `x-gateway-destination-endpoint`), and a picker deployed for one pool by flags."""

from __future__ import annotations

import json
import textwrap
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.client import chat, wait_for
from tests.conftest import BIN, POD_NET, free_port
from tests.picker_for_a_gateway import PickerForAGateway, health, post, round1_round2

NAMESPACE, POOL = "inference", "vllm-pool"
PODS = {f"vllm-{i}": f"{POD_NET}220.{i + 1}" for i in range(4)}
MODEL = "/models/Qwen3-32B"


REWRITE = textwrap.dedent(f"""\
    ---
    apiVersion: inference.networking.x-k8s.io/v1alpha2
    kind: InferenceModelRewrite
    metadata: {{name: latest, namespace: {NAMESPACE}}}
    spec:
      poolRef: {{name: {POOL}}}
      rules:
      - matches: [{{model: {{value: qwen-latest}}}}]
        targets: [{{modelRewrite: "{MODEL}", weight: 1}}]
    """)


def _envoy_bootstrap(listen_port: int, admin_port: int, picker_port: int) -> dict:
    """What Envoy AI Gateway renders for an HTTPRoute to an InferencePool, on loopback."""
    ext_proc = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": "endpointpicker_vllm-pool_inference_ext_proc",
                                        "authority": "vllm-pool-epp.inference.svc:9002"}},
        "processing_mode": {"request_header_mode": "SEND", "response_header_mode": "SEND",
                            "request_body_mode": "FULL_DUPLEX_STREAMED", "response_body_mode": "FULL_DUPLEX_STREAMED",
                            "request_trailer_mode": "SEND", "response_trailer_mode": "SEND"},
        "message_timeout": "300s", "failure_mode_allow": False, "allow_mode_override": False,
        # So the picker sees the gateway's subset hint and its served-endpoint report (below).
        "metadata_options": {"forwarding_namespaces": {"untyped": ["envoy.lb.subset_hint", "envoy.lb"]}},
    }
    # The test's stand-ins for a gateway's own logic: a header becomes the subset hint, and the
    # endpoint the request was sent to is reported as the one that served it.
    subset_from_header = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.header_to_metadata.v3.Config",
        "request_rules": [{"header": "x-test-subset", "remove": True, "on_header_present": {
            "metadata_namespace": "envoy.lb.subset_hint", "key": "x-gateway-destination-endpoint-subset",
            "type": "STRING"}}],
    }
    served_report = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
        "default_source_code": {"inline_string": textwrap.dedent("""\
            function envoy_on_request(handle)
              local picked = handle:headers():get("x-gateway-destination-endpoint")
              if picked then
                handle:streamInfo():dynamicMetadata():set("envoy.lb", "x-gateway-destination-endpoint-served", picked)
              end
            end
            """)},
    }
    listener = {
        "name": "gateway", "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                     ".HttpConnectionManager",
            "stat_prefix": "gateway",
            "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{
                "match": {"prefix": "/"},
                "route": {"cluster": "inferencepool/inference/vllm-pool", "timeout": "3600s"}}]}]},
            "http_filters": [
                {"name": "envoy.filters.http.header_to_metadata", "typed_config": subset_from_header},
                {"name": "envoy.filters.http.ext_proc/endpointpicker/vllm-pool_inference_ext_proc",
                 "typed_config": ext_proc},
                {"name": "envoy.filters.http.lua", "typed_config": served_report},
                {"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
            ]}}]}],
    }
    picker_cluster = {
        "name": "endpointpicker_vllm-pool_inference_ext_proc", "type": "STATIC", "connect_timeout": "10s",
        "lb_policy": "LEAST_REQUEST",
        "load_assignment": {"cluster_name": "epp", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
            "socket_address": {"address": "127.0.0.1", "port_value": picker_port}}}}]}]},
        "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {"validation_context": {}}}},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}},
    }
    pool_cluster = {
        "name": "inferencepool/inference/vllm-pool", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "10s",
        "original_dst_lb_config": {"use_http_header": True, "http_header_name": "x-gateway-destination-endpoint"},
    }
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
            "static_resources": {"listeners": [listener], "clusters": [picker_cluster, pool_cluster]}}


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as reply:
            return reply.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def drop_in(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PickerForAGateway]:
    fleet = PickerForAGateway(tmp_path_factory.mktemp("drop-in"), redis_url, PODS, POOL, NAMESPACE)
    admin = free_port()
    try:
        fleet.start(fleet.pool_manifest() + REWRITE)
        bootstrap = fleet.work / "envoy.json"
        bootstrap.write_text(json.dumps(_envoy_bootstrap(fleet.port, admin, fleet.picker)))
        fleet.spawn("envoy", [str(BIN / "envoy"), "-c", str(bootstrap), "--disable-hot-restart",
                              "--log-level", "warn", "--concurrency", "2"])
        deadline = time.monotonic() + 30
        while not _ready(f"http://127.0.0.1:{admin}/ready"):
            assert time.monotonic() < deadline, (fleet.work / "envoy.log").read_text()[-3000:]
            time.sleep(0.1)
        yield fleet
    finally:
        fleet.stop()


async def test_health_services_are_named_as_the_protocol_names_them(drop_in: PickerForAGateway) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    for service in ("liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor", ""):
        assert health(drop_in.health, service) == serving, service
    # The ext_proc port speaks TLS only.
    with pytest.raises(grpc.RpcError), grpc.insecure_channel(f"127.0.0.1:{drop_in.picker}") as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)


async def test_chat_through_full_duplex_streaming_and_tls(drop_in: PickerForAGateway) -> None:
    async def ready() -> bool:
        status, _, _ = await post(drop_in.port, chat("hello"))
        return status == 200

    await wait_for(ready, 30.0)
    status, pod, text = await post(drop_in.port, chat("What is the capital of France?", max_tokens=12))
    assert status == 200 and pod in PODS, text
    reply = json.loads(text)
    assert reply["choices"][0]["message"]["content"] and reply["usage"]["completion_tokens"] == 12


async def test_a_large_body_and_a_rewritten_one_reach_the_pod_whole(drop_in: PickerForAGateway) -> None:
    long_prompt = "Summarise the following log. " + "line of a long log with many words in it\n" * 2500  # 105 kB
    status, _, text = await post(drop_in.port, chat(long_prompt, max_tokens=3))
    assert status == 200, text
    assert json.loads(text)["usage"]["prompt_tokens"] > 20_000
    # An InferenceModelRewrite changes the body's length: the pod must still get valid JSON.
    status, _, text = await post(drop_in.port, chat("which model are you?", model="qwen-latest"))
    assert status == 200, text
    assert json.loads(text)["model"] == MODEL


async def test_streaming_with_usage_comes_back_whole(drop_in: PickerForAGateway) -> None:
    status, pod, text = await post(drop_in.port, chat("Count to five.", max_tokens=5, stream=True,
                                                      stream_options={"include_usage": True}))
    assert status == 200 and pod in PODS
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5


async def test_round1_then_round2_land_on_one_pod(drop_in: PickerForAGateway) -> None:
    first, second = await round1_round2(drop_in.port)
    assert first == second


@pytest.mark.parametrize("prefix_scoring", [True, False], ids=["affinity", "control-without-prefix-scoring"])
async def test_prompts_return_to_their_pods_by_the_prefix_index(drop_in: PickerForAGateway,
                                                                prefix_scoring: bool) -> None:
    await drop_in.assert_prompts_return(prefix_scoring, f"drop-in {prefix_scoring}")


@pytest.mark.parametrize(("raw", "method", "status", "param"), [
    (b"{not json", "POST", 400, None),
    (b"", "POST", 400, None),
    (json.dumps({"model": MODEL}).encode(), "POST", 400, "messages"),
    (json.dumps({"model": MODEL, "messages": [1, 2, 3]}).encode(), "POST", 400, "messages[0]"),
    # 100 kB: it reaches the picker in several chunks.
    (b'{"model": "m", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "POST", 400, None),
    (b"", "GET", 405, None),
])
async def test_bad_input_gets_an_openai_error(drop_in: PickerForAGateway, raw: bytes, method: str, status: int,
                                              param: str | None) -> None:
    got, _, text = await post(drop_in.port, None, raw=raw, method=method)
    assert got == status, text
    error = json.loads(text)["error"]
    assert error["code"] == status and error["message"]
    if param:
        assert error["param"] == param


async def test_the_subset_hint_narrows_the_candidates(drop_in: PickerForAGateway) -> None:
    only = f"{PODS['vllm-2']}:8000"
    served = Counter()
    for i in range(8):
        status, pod, _ = await post(drop_in.port, chat(f"subset {i} " * 30), {"x-test-subset": only})
        assert status == 200
        served[pod] += 1
    assert served == {"vllm-2": 8}
    status, _, text = await post(drop_in.port, chat("nowhere"), {"x-test-subset": "127.255.255.1:8000"})
    assert status == 503 and "subset" in json.loads(text)["error"]["message"]


async def test_the_served_endpoint_report_is_counted(drop_in: PickerForAGateway) -> None:
    status, _, _ = await post(drop_in.port, chat("count me"))
    assert status == 200
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{drop_in.metrics}/metrics") as r:
        text = await r.text()
    assert 'picker_served_endpoints_total{outcome="picked",pool="inference/vllm-pool"}' in text
