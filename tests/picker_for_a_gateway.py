"""A picker deployed for one pool, as a gateway's endpoint picker, with what it needs: simulated pods, a
controller publishing the pool from a manifest (no Envoy files: the gateway runs Envoy), a collector.
The tests put a gateway of their own in front (an Envoy configured as Envoy AI Gateway does; Envoy Gateway)."""

from __future__ import annotations

import json
import subprocess
import textwrap
import time
from pathlib import Path

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.client import QWEN
from tests.conftest import BIN, FIXTURES, free_port


def health(port: int, service: str) -> int:
    """The gRPC health status of `service`, or -1 when the server does not answer."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            return int(health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2).status)
        except grpc.RpcError:
            return -1


async def post(port: int, body: object, headers: dict[str, str] | None = None,
               raw: bytes | None = None, method: str = "POST") -> tuple[int, str, str]:
    """(status, the pod that answered, the body) of a chat completion through the gateway at `port`."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http, http.request(
            method, f"http://127.0.0.1:{port}/v1/chat/completions",
            data=raw if raw is not None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **(headers or {})}) as r:
        return r.status, r.headers.get("x-inference-pod", ""), await r.text()


async def round1_round2(port: int) -> tuple[str, str]:
    """The seeds' prefix test through the gateway at `port`: the pods that served round1, then round2."""
    pods = []
    for name in ("round1.txt", "round2.txt"):
        status, pod, text = await post(port, None, raw=(FIXTURES / name).read_bytes())
        assert status == 200, text
        pods.append(pod)
    return pods[0], pods[1]


class PickerForAGateway:
    def __init__(self, work: Path, redis_url: str, pods: dict[str, str], pool: str, namespace: str) -> None:
        self.work, self.redis_url, self.pods, self.pool, self.namespace = work, redis_url, pods, pool, namespace
        self.picker, self.health, self.metrics = free_port(), free_port(), free_port()
        self.port = free_port()  # where the test's gateway listens
        self.processes: list[subprocess.Popen[bytes]] = []
        self._named: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, argv: list[str]) -> None:
        with (self.work / f"{name}.log").open("ab") as log:
            self._named[name] = process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
            self.processes.append(process)

    def pool_manifest(self) -> str:
        """The pool (InferencePool v1, prefix-aware, the picker as its endpoint picker) and its Ready pods."""
        pods = "".join(textwrap.dedent(f"""\
            ---
            apiVersion: v1
            kind: Pod
            metadata: {{name: {name}, namespace: {self.namespace}, labels: {{app: {self.pool}}}}}
            status:
              podIP: {ip}
              conditions: [{{type: Ready, status: "True"}}]
            """) for name, ip in self.pods.items())
        return textwrap.dedent(f"""\
            apiVersion: inference.networking.k8s.io/v1
            kind: InferencePool
            metadata:
              name: {self.pool}
              namespace: {self.namespace}
              annotations: {{inference.networking.x-k8s.io/routing-strategy: PREFIX_CACHE}}
            spec:
              selector: {{matchLabels: {{app: {self.pool}}}}}
              targetPorts: [{{number: 8000}}]
              endpointPickerRef: {{name: {self.pool}-epp, port: {{number: 9002}}, failureMode: FailClose}}
            """) + pods

    def start(self, manifest: str) -> None:
        """Pods, controller, collector and the picker (TLS, the pool by flags); then until it is ready."""
        manifests = self.work / "manifests"
        manifests.mkdir()
        (manifests / "pool.yaml").write_text(manifest)
        self.spawn("pods", [str(BIN / "model-server-simulator"), "--time-scale", "0.5",
                            *[a for name, ip in self.pods.items() for a in ("--pod", f"{name}@{ip}:8000")]])
        self.spawn("controller", [str(BIN / "controller"), "--manifests", str(manifests), "--redis-url",
                                  self.redis_url, "--controller-id", self.work.name])
        self.spawn("collector", [str(BIN / "collector"), "--redis-url", self.redis_url,
                                 "--collector-id", self.work.name])
        self.start_picker()

    def start_picker(self, *scheduling: str) -> None:
        """The picker, with the rendezvous home off: a prefix returns to its pod only through the prefix
        index, so the gateways' affinity tests test the index. `scheduling`: more NAME=VALUE overrides."""
        self.spawn("picker", [str(BIN / "picker"), "--pool-name", self.pool, "--pool-namespace", self.namespace,
                              "--grpc-address", f"127.0.0.1:{self.picker}",
                              "--grpc-health-address", f"127.0.0.1:{self.health}",
                              "--metrics-address", f"127.0.0.1:{self.metrics}", "--redis-url", self.redis_url,
                              "--replica-id", self.work.name,
                              *(a for o in ("prefix_home_weight=0", *scheduling) for a in ("--scheduling", o))])
        deadline = time.monotonic() + 60
        while health(self.health, "readiness") != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, (self.work / "picker.log").read_text()[-3000:]
            time.sleep(0.1)

    def pid(self, name: str) -> int:
        """The process id of what was spawned as `name` (its latest start)."""
        return self._named[name].pid

    def restart_picker(self, *scheduling: str) -> None:
        picker = self._named["picker"]
        picker.terminate()
        picker.wait(15)
        self.start_picker(*scheduling)

    async def assert_prompts_return(self, prefix_scoring: bool, label: str) -> None:
        """8 distinct long prompts, then the same 8 again, through the gateway: they return to their pods
        through the prefix index (the rendezvous home is off here); the control turns prefix scoring off as
        well (`prefix_scoring` False), and the same prompts then scatter."""
        async def pods() -> list[str]:
            replies = [await post(self.port, {"model": QWEN, "max_tokens": 2, "messages": [
                {"role": "user", "content": f"{label} conversation {i} " * 40}]}) for i in range(8)]
            assert all(status == 200 for status, _, _ in replies), replies
            return [pod for _, pod, _ in replies]

        if not prefix_scoring:
            self.restart_picker("prefix_weight=0")
        try:
            firsts, again = await pods(), await pods()
        finally:
            if not prefix_scoring:
                self.restart_picker()
        assert len(set(firsts)) >= 2, firsts  # spread: one pod taking everything would prove nothing
        assert (firsts == again) is prefix_scoring, (firsts, again)

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.terminate()
        for proc in self.processes:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
