"""The routers under test, all in front of the same simulated pods.

Ours and Envoy's baselines are listeners of one local fleet; the peers
(PyPI `sglang-router`, `vllm-router`, and the upstream endpoint picker behind an
Envoy of its own) run as their own processes on loopback.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

MODEL = "/models/Qwen3-32B"


@dataclass(frozen=True)
class Router:
    name: str
    # "envoy": a listener of the fleet; "picker-local": ours with per-replica state; "peer": a process;
    # "upstream": the upstream endpoint picker behind an Envoy of its own (benchmarks/upstream_epp.py);
    # "floor": our listener with trivial ext_proc servers in the pickers' place (benchmarks/extproc_floor.py)
    kind: str
    port: int
    model: str = MODEL  # what clients send; our pools take an alias and rewrite it
    command: tuple[str, ...] = ()  # peers: the executable and its policy arguments
    replicas: int = 1  # the upstream picker's replicas, active-active


def routers(peer_port: int = 30100, upstream_port: int = 30200) -> list[Router]:
    return [
        Router("round_robin", "envoy", 8092),
        Router("random", "envoy", 8093),
        Router("least_queue", "envoy", 8094),  # Envoy LEAST_REQUEST: fewest requests outstanding
        Router("sglang_cache_aware", "peer", peer_port, command=("sglang-router", "cache_aware")),
        Router("sglang_round_robin", "peer", peer_port, command=("sglang-router", "round_robin")),
        Router("vllm_router_cache_aware", "peer", peer_port, command=("vllm-router", "cache_aware")),
        Router("upstream_epp", "upstream", upstream_port),
        Router("upstream_epp_2_replicas", "upstream", upstream_port, replicas=2),
        Router("ours_default", "envoy", 8090, model="bench-default"),
        Router("ours_prefix_cache", "envoy", 8091, model="bench-prefix"),
        Router("ours_events", "envoy", 8095, model="bench-events"),  # PREFIX_CACHE on the engines' KV events
        Router("ours_prefix_memory_2_replicas", "picker-local", 8091, model="bench-prefix"),
        # Round robin by two ext_proc servers that decide nothing: what Envoy's ext_proc on Python's gRPC
        # costs every request, whatever the router behind it does.
        Router("ext_proc_floor", "floor", 8091),
    ]


def manifests(directory: Path, runtime: str, pods: list[str]) -> None:
    """Pools, Services and listeners for every router of the fleet, over the same pods (which publish their
    KV-cache events, as the events pool asks: the local fleet starts them so for every router)."""
    runtime_note = f'\n    inference.networking.x-k8s.io/model-server-runtime: "{runtime}"'
    docs = []
    events_note = '\n    inference-gateway.io/prefix-index: "events"'
    for name, strategy, note in (("bench-default", "DEFAULT", ""), ("bench-prefix", "PREFIX_CACHE", ""),
                                 ("bench-events", "PREFIX_CACHE", events_note)):
        docs.append(f"""apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferencePool
metadata:
  name: {name}
  annotations:
    inference.networking.x-k8s.io/routing-strategy: "{strategy}"{runtime_note}{note}
spec:
  targetPortNumber: 8000
  selector: {{app: bench}}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModel
metadata:
  name: {name}
spec:
  modelName: {name}
  poolRef: {{name: {name}}}
  targetModels: [{{name: {MODEL}, weight: 1}}]""")
    for name, policy in (("bench-rr", "ROUND_ROBIN"), ("bench-random", "RANDOM"), ("bench-least", "LEAST_REQUEST")):
        docs.append(f"""apiVersion: v1
kind: Service
metadata:
  name: {name}
  annotations: {{inference-gateway.io/lb-policy: {policy}}}
spec:
  selector: {{app: bench}}
  ports: [{{port: 8000}}]""")
    listeners = {8090: ("InferencePool", "bench-default"), 8091: ("InferencePool", "bench-prefix"),
                 8095: ("InferencePool", "bench-events"),
                 8092: ("Service", "bench-rr"), 8093: ("Service", "bench-random"), 8094: ("Service", "bench-least")}
    docs.append("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: bench}\nspec:\n"
                "  listeners:\n" + "".join(f"  - {{name: l{p}, protocol: HTTP, port: {p}}}\n" for p in listeners))
    for port, (kind, backend) in listeners.items():
        ref = f"{{kind: {kind}, name: {backend}" + (", port: 8000}" if kind == "Service" else "}")
        docs.append(f"""apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r{port}}}
spec:
  parentRefs: [{{name: bench, sectionName: l{port}}}]
  rules: [{{backendRefs: [{ref}]}}]""")
    for pod in pods:
        name, ip = pod.split("@")
        docs.append(f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: bench}}}}\n"
                    f"status: {{phase: Running, podIP: {ip.split(':')[0]}}}")
    (directory / "bench.yaml").write_text("\n---\n".join(docs) + "\n")


def tokenizer_file(directory: Path) -> Path:
    """A word-level tokenizer file, so the peers never try to download one (there is no network here)."""
    path = directory / "tokenizer.json"
    path.write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": {"[UNK]": 0}, "unk_token": "[UNK]"},
    }))
    return path


def wait_routable(port: int, processes: list[subprocess.Popen[bytes]], name: str, logs: Path,
                  timeout_s: float) -> None:
    """Until a chat request to the router on `port` comes back 200; raises if one of its processes exits
    (their logs are in `logs`) or the time runs out."""
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "warm up"}], "max_tokens": 1}).encode()
    deadline, last = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        for proc in processes:
            if proc.poll() is not None:
                raise RuntimeError(f"{name}: {proc.args[0]} exited with {proc.returncode}; see the logs in {logs}")
        try:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.3)
    raise TimeoutError(f"{name} did not route within {timeout_s:.0f} s ({last}); see the logs in {logs}")


class PeerProcess:
    """A peer router on loopback, started fresh for each run."""

    def __init__(self, router: Router, workers: list[str], work_dir: Path) -> None:
        self.router, self.workers, self.work_dir = router, workers, work_dir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> None:
        executable, policy = self.router.command
        urls = [f"http://{w}" for w in self.workers]
        if executable == "sglang-router":
            launcher = [sys.executable, "-m", "sglang_router.launch_router"]
        else:
            launcher = [shutil.which(executable, path=str(Path(sys.executable).parent)) or executable]
        args = [*launcher, "--host", "127.0.0.1", "--port", str(self.router.port), "--policy", policy,
                "--worker-urls", *urls, "--prometheus-host", "127.0.0.1",
                "--prometheus-port", str(self.router.port + 1)]
        if executable == "sglang-router":
            args += ["--tokenizer-path", str(tokenizer_file(self.work_dir)), "--log-level", "warn"]
        log = (self.work_dir / f"{self.router.name}.log").open("wb")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        wait_routable(self.router.port, [self.proc], self.router.name, self.work_dir, timeout_s)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
