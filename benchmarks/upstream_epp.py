"""The upstream endpoint picker (the Gateway API Inference Extension's EPP, v1.5.0, built from its Go
module by `testbed.build`) as a benchmark peer, on the same simulated pods as ours.

It discovers the pods the way it does in a cluster: from a real Kubernetes API server
(`testbed.kube`) holding an InferencePool (inference.networking.k8s.io/v1) and Pods whose
status carries the simulated pods' loopback addresses. Each replica serves plaintext ext_proc;
an Envoy of its own is configured as a gateway configures an InferencePool backend (ext_proc
with full-duplex streamed bodies, an ORIGINAL_DST cluster reading the picker's
`x-gateway-destination-endpoint`). With two replicas, Envoy spreads the streams over both,
active-active, each with its own prefix index, as upstream runs without leader election.
The scheduling profile is upstream's chart default: queue 2, KV cache 2, prefix cache 3.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from benchmarks.routers import wait_routable
from local_fleet.fleet import binary as fleet_binary
from testbed.build import binary as go_binary
from testbed.kube import KubeAPIServer, free_port
from testbed.kube_admin import CHART_CRDS, Kube

POOL, NAMESPACE = "bench-upstream", "default"


def picker_config(runtime: str) -> str:
    """Upstream's chart default (config/charts/epplib's default-plugins.yaml) without a latency predictor."""
    engine = "" if runtime == "vllm" else f"\n  parameters:\n    defaultEngine: {runtime}"
    return f"""apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: metrics-data-source
  parameters:
    scheme: http
    path: /metrics
    insecureSkipVerify: true
- type: core-metrics-extractor{engine}
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
"""


def envoy_bootstrap(listen_port: int, admin_port: int, picker_ports: list[int]) -> dict[str, Any]:
    ext_proc = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": "epp"}},
        "processing_mode": {"request_header_mode": "SEND", "response_header_mode": "SEND",
                            "request_body_mode": "FULL_DUPLEX_STREAMED", "response_body_mode": "FULL_DUPLEX_STREAMED",
                            "request_trailer_mode": "SEND", "response_trailer_mode": "SEND"},
        "message_timeout": "300s", "failure_mode_allow": False, "allow_mode_override": True,
    }
    listener = {
        "name": "upstream", "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                     ".HttpConnectionManager",
            "stat_prefix": "upstream",
            "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{
                "match": {"prefix": "/"}, "route": {"cluster": "pool", "timeout": "3600s"}}]}]},
            "http_filters": [
                {"name": "envoy.filters.http.ext_proc", "typed_config": ext_proc},
                {"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
            ]}}]}],
    }
    pickers = {
        "name": "epp", "type": "STATIC", "connect_timeout": "10s", "lb_policy": "ROUND_ROBIN",
        "load_assignment": {"cluster_name": "epp", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
            for p in picker_ports]}]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}},
    }
    pool = {
        "name": "pool", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "10s",
        "original_dst_lb_config": {"use_http_header": True, "http_header_name": "x-gateway-destination-endpoint"},
    }
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
            "static_resources": {"listeners": [listener], "clusters": [pickers, pool]}}


class UpstreamPicker:
    """`start(replicas)` brings up the API server (unless it runs), the pickers and their Envoy on
    `port`; `stop_pickers()` ends the pickers and Envoy, `stop()` everything."""

    def __init__(self, work_dir: Path, runtime: str, endpoints: list[str], port: int) -> None:
        self.work_dir, self.runtime, self.endpoints, self.port = work_dir, runtime, endpoints, port
        self.kube: KubeAPIServer | None = None
        self.processes: list[subprocess.Popen[bytes]] = []

    def _cluster(self) -> None:
        directory = self.work_dir / "kube"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir()
        self.kube = KubeAPIServer(directory)
        self.kube.start()
        admin = Kube(self.kube)
        try:
            admin.install_crds(sorted(CHART_CRDS.glob("*.yaml")))
            for i, endpoint in enumerate(self.endpoints):
                admin.create_pod(NAMESPACE, f"upstream-pod-{i}", {"app": "bench"}, endpoint.split(":")[0])
            admin.apply({"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
                         "metadata": {"name": POOL},
                         "spec": {"selector": {"matchLabels": {"app": "bench"}},
                                  "targetPorts": [{"number": int(self.endpoints[0].split(":")[1])}],
                                  "endpointPickerRef": {"name": f"{POOL}-epp", "port": {"number": 9002}}}},
                        NAMESPACE)
        finally:
            admin.close()

    def start(self, replicas: int, timeout_s: float = 120.0) -> None:
        if self.kube is None:
            self._cluster()
        assert self.kube is not None
        config = self.work_dir / f"epp-{self.runtime}.yaml"
        config.write_text(picker_config(self.runtime))
        ports = []
        for r in range(replicas):
            grpc_port = free_port()
            ports.append(grpc_port)
            self._spawn(f"epp-{r}", [str(go_binary("epp")), "--pool-name", POOL, "--pool-namespace", NAMESPACE,
                                     "--grpc-port", str(grpc_port), "--grpc-health-port", str(free_port()),
                                     "--metrics-port", str(free_port()), "--secure-serving=false",
                                     "--metrics-endpoint-auth=false", "--tracing=false", "--enable-pprof=false",
                                     "--config-file", str(config), "--zap-log-level", "error",
                                     "--zap-encoder", "console"],
                        env={"KUBECONFIG": str(self.kube.kubeconfig), "NAMESPACE": NAMESPACE})
        admin_port = free_port()
        bootstrap = self.work_dir / "upstream-envoy.json"
        bootstrap.write_text(json.dumps(envoy_bootstrap(self.port, admin_port, ports)))
        self._spawn("upstream-envoy", [fleet_binary("envoy"), "-c", str(bootstrap), "--disable-hot-restart",
                                       "--log-level", "warn", "--concurrency", "2"])
        # Routable once the pickers have seen the pods' metrics.
        wait_routable(self.port, self.processes, "the upstream picker", self.work_dir, timeout_s)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = (self.work_dir / f"{name}.log").open("ab")
        self.processes.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                               env={**os.environ, **(env or {})}))

    def stop_pickers(self) -> None:
        for p in reversed(self.processes):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        self.processes.clear()

    def stop(self) -> None:
        self.stop_pickers()
        if self.kube is not None:
            self.kube.stop()
            self.kube = None
