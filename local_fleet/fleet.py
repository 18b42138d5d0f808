"""Run the whole fleet on loopback as real processes: Redis, pods, controller, Envoy, collector
and picker replicas. `make up` and the test suite both use it.

The pods are the endpoints the manifests' pools and Services select, each on its own loopback
address at its target port: llama.cpp's real server for a pool that declares the llama.cpp engine
(local_fleet.llama_server), simulated vLLM or SGLang servers for the others.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import yaml

from controller.desired import build
from controller.resources import load_directory
from gateway_state.records import Runtime
from local_fleet import llama_server
from tokenization.model_tokenizer import bundled_model

SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the checkout this fleet's processes run


@dataclass(frozen=True)
class FleetSettings:
    manifests_dir: Path
    work_dir: Path
    redis_url: str | None = None  # None: start our own Redis
    redis_port: int = 6379
    # Non-empty: start our own Redis Cluster with one master per port instead.
    redis_cluster_ports: tuple[int, ...] = ()
    picker_ports: tuple[int, ...] = (9002, 9003)
    picker_metrics_ports: tuple[int, ...] = (9102, 9103)
    # Each picker's admin API and status page (empty: none); the tokens go to work_dir/admin-tokens.yaml.
    picker_admin_ports: tuple[int, ...] = (9202, 9203)
    # /metrics of each collector and controller (empty: not served).
    collector_metrics_ports: tuple[int, ...] = ()
    controller_metrics_ports: tuple[int, ...] = ()
    envoy_admin_port: int = 9901
    # Envoy's listener for the platform (`/ready` while a picker is healthy, `/stats/prometheus`); 0: none.
    envoy_health_port: int = 0
    listen_address: str = "127.0.0.1"
    scrape_interval_ms: int = 100
    resync_interval_ms: int = 500
    simulator_args: tuple[str, ...] = ()  # physics flags, e.g. ("--time-scale", "0.5")
    llama_args: tuple[str, ...] = ()  # more flags for llama.cpp pods (local_fleet.llama_server.command)
    picker_args: tuple[str, ...] = ()
    collector_args: tuple[str, ...] = ()
    collectors: int = 1
    controllers: int = 1  # one leads, the others stand by
    pod_per_process: bool = False  # each simulated pod in its own process, so one can be killed
    # Pods the manifests declare ready but that are not started: a stale manifest, for tests.
    absent_pods: tuple[str, ...] = ()
    # Set: the controllers read a Kubernetes API server instead of manifests_dir, which
    # then only says which pods to simulate.
    kubeconfig: Path | None = None

    def __post_init__(self) -> None:
        if len(self.picker_ports) != len(self.picker_metrics_ports):
            raise ValueError("each picker needs a gRPC port and a metrics port")
        if self.picker_admin_ports and len(self.picker_admin_ports) != len(self.picker_ports):
            raise ValueError("each picker needs an admin port, or none has one")


def binary(name: str) -> str:
    """A console script or server binary installed beside this interpreter (the project venv)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed; run `make venv`")
    return found


def _http_ok(url: str, timeout: float = 0.5) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status: int = response.status
            return 200 <= status < 300
    except OSError:
        return False


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_cluster_ports(count: int) -> tuple[int, ...]:
    """Ports for Redis Cluster nodes; each node's bus port (port + 10000) must be free too."""
    ports: list[int] = []
    for port in range(random.randrange(20000, 29000), 30000):
        if _bindable(port) and _bindable(port + 10000):
            ports.append(port)
            if len(ports) == count:
                return tuple(ports)
    raise RuntimeError("no free ports for a Redis Cluster")


def redis_cluster_node(port: int, data_dir: Path) -> list[str]:
    """The command of one master of a local Redis Cluster, its files in `data_dir`."""
    return [binary("redis-server"), "--bind", "127.0.0.1", "--port", str(port), "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000", "--dir", str(data_dir),
            "--save", "", "--appendonly", "no", "--protected-mode", "no"]


def create_redis_cluster(ports: Sequence[int]) -> None:
    """Join the running nodes on `ports` into one cluster of masters, the slots split between them."""
    subprocess.run([binary("redis-cli"), "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
                    "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)


def redis_cluster_ok(ports: Sequence[int]) -> bool:
    return all(b"cluster_state:ok" in subprocess.run(
        [binary("redis-cli"), "-p", str(p), "cluster", "info"], capture_output=True, timeout=10).stdout for p in ports)


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


@dataclass
class Fleet:
    settings: FleetSettings
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _logs: dict[str, IO[bytes]] = field(default_factory=dict)
    _commands: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict)

    @property
    def redis_url(self) -> str:
        s = self.settings
        if s.redis_url:
            return s.redis_url
        if s.redis_cluster_ports:
            return f"redis-cluster://127.0.0.1:{s.redis_cluster_ports[0]}"
        return f"redis://127.0.0.1:{s.redis_port}/0"


    @property
    def admin_tokens(self) -> dict[str, str]:
        """scope -> the admin API's bearer token of this fleet (made at its start)."""
        path = self.settings.work_dir / "admin-tokens.yaml"
        tokens = yaml.safe_load(path.read_text())["tokens"] if path.exists() else {}
        return {scope: token for token, scope in tokens.items()}

    def _write_admin_tokens(self) -> Path:
        path = self.settings.work_dir / "admin-tokens.yaml"
        path.write_text(yaml.safe_dump({"tokens": {secrets.token_hex(16): "read", secrets.token_hex(16): "admin"}}))
        path.chmod(0o600)
        return path

    @property
    def envoy_dir(self) -> Path:
        return self.settings.work_dir / "envoy"

    def log_path(self, name: str) -> Path:
        return self.settings.work_dir / "logs" / f"{name}.log"

    def pods(self) -> dict[str, tuple[str, str]]:
        """endpoint key -> (pod name, runtime) of every pod a pool or Service selects."""
        state = build(load_directory(self.settings.manifests_dir))
        pods: dict[str, tuple[str, str]] = {}
        for pool in state.pools.values():
            for e in pool.endpoints:
                pods[e.key] = (e.name, pool.runtime.value)
        for endpoints in state.services.values():
            for e in endpoints:
                pods.setdefault(e.key, (e.name, "vllm"))
        return pods

    def first_pool(self) -> str:
        """The name of the manifests' first pool (`namespace/name`), for examples."""
        return next(iter(build(load_directory(self.settings.manifests_dir)).pools), "default/none")

    def llama_cpp_pods(self) -> dict[str, str]:
        """endpoint key -> the model name its llama.cpp server answers to (`--alias`), for every pod of a
        pool that declares the llama.cpp engine: the first model the pool's InferenceModels route to,
        else the pod's own name."""
        state = build(load_directory(self.settings.manifests_dir))
        aliases: dict[str, str] = {}
        for pool in state.pools.values():
            if pool.runtime is Runtime.LLAMA_CPP:
                targets = sorted(t.name for m in state.models.get(pool.name, {}).values() for t in m.targets)
                for e in pool.endpoints:
                    aliases[e.key] = targets[0] if targets else e.name
        return aliases

    def pod_roles(self) -> dict[str, tuple[str, ...]]:
        """endpoint key -> the simulator flags of an SGLang PD pool's pod (its side and bootstrap port), and of
        a pool indexed from engine events (its engine's `--kv-events-config`, on the pool's ports)."""
        state = build(load_directory(self.settings.manifests_dir))
        roles: dict[str, tuple[str, ...]] = {}
        for pool in state.pools.values():
            if pool.kv_events is not None:
                config = {"enable_kv_cache_events": True, "publisher": "zmq",
                          "endpoint": f"tcp://*:{pool.kv_events.port}",
                          "replay_endpoint": f"tcp://*:{pool.kv_events.replay_port}" if pool.kv_events.replay_port
                          else None}
                for e in pool.endpoints:
                    roles[e.key] = ("--kv-events-config", json.dumps(config))
            if pool.pd is None:
                continue
            for side in ("prefill", "decode"):
                for e in pool.side(side):
                    roles[e.key] = (*roles.get(e.key, ()), "--disaggregation-mode", side,
                                    "--disaggregation-bootstrap-port", str(pool.pd.bootstrap_port))
        return roles

    def uses_engine_events(self) -> bool:
        return any(p.kv_events is not None for p in build(load_directory(self.settings.manifests_dir)).pools.values())

    # -- lifecycle -----------------------------------------------------------------

    def start(self, timeout_s: float = 60.0) -> None:
        s = self.settings
        (s.work_dir / "logs").mkdir(parents=True, exist_ok=True)
        self.envoy_dir.mkdir(parents=True, exist_ok=True)
        env = {"REDIS_URL": self.redis_url}
        if s.redis_url is None and s.redis_cluster_ports:
            self._start_redis_cluster(timeout_s)
        elif s.redis_url is None:
            # Append-only, so a Redis the supervisor restarts comes back with the prefix index;
            # a new fleet starts empty.
            data = s.work_dir / "redis"
            shutil.rmtree(data, ignore_errors=True)
            data.mkdir()
            self._spawn("redis", [binary("redis-server"), "--bind", "127.0.0.1", "--port", str(s.redis_port),
                                  "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(data),
                                  "--protected-mode", "no"])
            self._wait("redis", lambda: _port_open("127.0.0.1", s.redis_port), timeout_s)
        by_kind: dict[tuple[str, tuple[str, ...]], list[str]] = {}  # (runtime, PD flags) -> simulated pods
        roles, real = self.pod_roles(), self.llama_cpp_pods()
        for key, (name, runtime) in self.pods().items():
            if name in s.absent_pods:
                continue
            if key in real:  # a real engine: llama.cpp's server with a real model, one process a pod
                host, port_text = key.rsplit(":", 1)
                self._spawn(f"pod-{name}", llama_server.command(real[key], host, int(port_text), s.llama_args))
            else:
                by_kind.setdefault((runtime, roles.get(key, ())), []).append(f"{name}@{key}")
        simulator = binary("model-server-simulator")
        for (runtime, flags), specs in sorted(by_kind.items()):
            if s.pod_per_process:
                for spec in specs:
                    self._spawn(f"pod-{spec.split('@')[0]}", [simulator, "--runtime", runtime, "--pod", spec,
                                                             *flags, *s.simulator_args])
            else:
                side = [flags[i + 1] for i, f in enumerate(flags) if f == "--disaggregation-mode"]
                events = "-events" if "--kv-events-config" in flags else ""
                name = f"pods-{runtime}" + (f"-{side[0]}" if side else "") + events
                self._spawn(name, [simulator, "--runtime", runtime, *[a for spec in specs for a in ("--pod", spec)],
                                   *flags, *s.simulator_args])
        self.wait_pods(timeout_s)
        pickers = [a for p in s.picker_ports for a in ("--picker-endpoint", f"127.0.0.1:{p}")]
        source = ["--kubernetes", "--kubeconfig", str(s.kubeconfig)] if s.kubeconfig else [
            "--manifests", str(s.manifests_dir)]
        for i in range(s.controllers):
            metrics = ["--metrics-address", f"127.0.0.1:{s.controller_metrics_ports[i]}"] \
                if i < len(s.controller_metrics_ports) else []
            self._spawn(f"controller-{i}", [
                binary("controller"), "--controller-id", f"controller-{i}", *source, *metrics,
                "--envoy-config-dir", str(self.envoy_dir), "--listen-address", s.listen_address,
                "--envoy-admin-port", str(s.envoy_admin_port), "--envoy-health-port", str(s.envoy_health_port),
                "--resync-interval-ms", str(s.resync_interval_ms), *pickers], env)
        self._wait("controller", lambda: (self.envoy_dir / "lds.json").exists(), timeout_s)
        for i in range(s.collectors):
            metrics = ["--metrics-address", f"127.0.0.1:{s.collector_metrics_ports[i]}"] \
                if i < len(s.collector_metrics_ports) else []
            # The embedded Envoy's per-pool ext_proc counters: requests served without a picker.
            self._spawn(f"collector-{i}", [binary("collector"), "--collector-id", f"collector-{i}",
                                           "--scrape-interval-ms", str(s.scrape_interval_ms), *metrics,
                                           "--gateway-stats", f"envoy={self.envoy_stats_url}", *s.collector_args], env)
        tokens = self._write_admin_tokens() if s.picker_admin_ports else None
        # Pools indexed from engine events need the engines' tokenizer: the simulated pods' model's.
        tokenizer = ("--tokenizer", str(bundled_model())) if self.uses_engine_events() else ()
        for i, (port, metrics_port) in enumerate(zip(s.picker_ports, s.picker_metrics_ports, strict=True)):
            admin = ["--admin-address", f"127.0.0.1:{s.picker_admin_ports[i]}",
                     "--admin-tokens-file", str(tokens)] if tokens else []
            # Plaintext on loopback: the embedded Envoy talks to its pickers on this machine only.
            self._spawn(f"picker-{i}", [binary("picker"), "--no-secure-serving", "--grpc-address", f"127.0.0.1:{port}",
                                        "--metrics-address", f"127.0.0.1:{metrics_port}",
                                        "--replica-id", f"picker-{i}", *admin, *tokenizer, *s.picker_args], env)
        # Envoy last, once every picker serves: its first health checks then pass before its listeners
        # open (Envoy initializes its clusters, health checks included, before it listens), so no request
        # reaches :8080 while the picker cluster has no healthy host and the pool fails open.
        self.wait_pickers_ready(timeout_s)
        self._spawn("envoy", [binary("envoy"), "-c", str(self.envoy_dir / "bootstrap.json"), "--disable-hot-restart",
                              "--log-level", "warn", "--concurrency", "2"])
        self.wait_pickers_routable(timeout_s)

    def wait_pods(self, timeout_s: float = 30.0) -> None:
        """Until every pod answers /health (llama.cpp's once its model is loaded)."""
        absent = self.settings.absent_pods
        for key, (name, _) in self.pods().items():
            if name not in absent:
                self._wait("pods", lambda key=key: _http_ok(f"http://{key}/health"), timeout_s)

    def wait_pickers_ready(self, timeout_s: float = 30.0) -> None:
        """Until every picker replica has a config and serves."""
        for metrics_port in self.settings.picker_metrics_ports:
            self._wait("pickers", lambda p=metrics_port: _http_ok(f"http://127.0.0.1:{p}/healthz"), timeout_s)

    def wait_pickers_routable(self, timeout_s: float = 30.0) -> None:
        """Until every picker replica is ready and Envoy's health checks route to it."""
        self.wait_pickers_ready(timeout_s)
        self.wait_envoy_routes_to_pickers(timeout_s)

    @property
    def envoy_stats_url(self) -> str:
        """Envoy's Prometheus page, its ext_proc counters only: on the platform listener when there is one
        (as the chart's collectors read it), else from the admin port."""
        port = self.settings.envoy_health_port or self.settings.envoy_admin_port
        return f"http://127.0.0.1:{port}/stats/prometheus?filter=ext_proc"

    def envoy_counter(self, name: str) -> int:
        """An Envoy statistic summed over the names its admin `filter` (a regex) matches: a counter
        across listeners or clusters."""
        url = f"http://127.0.0.1:{self.settings.envoy_admin_port}/stats?filter={name}"
        with urllib.request.urlopen(url, timeout=5) as r:
            return sum(int(line.rsplit(":", 1)[1]) for line in r.read().decode().splitlines() if line.strip())

    def wait_envoy_routes_to_pickers(self, timeout_s: float = 30.0) -> None:
        """Until Envoy is ready and its health checks pass every host on the picker ports."""
        self._wait("envoy", self._envoy_ready, timeout_s)

    def _start_redis_cluster(self, timeout_s: float) -> None:
        ports = self.settings.redis_cluster_ports
        for port in ports:
            data = self.settings.work_dir / f"redis-{port}"
            data.mkdir(exist_ok=True)
            self._spawn(f"redis-{port}", redis_cluster_node(port, data))
        for port in ports:
            self._wait("redis cluster nodes", lambda port=port: _port_open("127.0.0.1", port), timeout_s)
        create_redis_cluster(ports)
        self._wait("redis cluster", lambda: redis_cluster_ok(ports), timeout_s)

    def _envoy_ready(self) -> bool:
        admin = f"http://127.0.0.1:{self.settings.envoy_admin_port}"
        if not _http_ok(admin + "/ready"):
            return False
        try:
            with urllib.request.urlopen(admin + "/clusters?format=json", timeout=0.5) as r:
                clusters = json.load(r)
        except OSError:
            return False
        for cluster in clusters.get("cluster_statuses", []):
            if cluster["name"] == "picker":
                hosts = cluster.get("host_statuses", [])
                return bool(hosts) and all(h.get("health_status", {}).get("eds_health_status") == "HEALTHY"
                                           and len(h["health_status"]) == 1 for h in hosts)
        return False

    def supervise(self, stopping: Callable[[], bool], log: Callable[[str], None]) -> None:
        """Until `stopping()`: restart any process that exits, as a process manager would,
        after a backoff that doubles on each quick exit (0.25 s up to 8 s) and resets once
        the process has run for a minute. The others keep serving meanwhile.

        `stopping` is polled, not waited on, so a signal handler may flip it: a handler that
        set a threading.Event could deadlock on the lock the waiting thread holds."""
        started = {name: time.monotonic() for name in self.processes}
        failures = dict.fromkeys(self.processes, 0)
        due: dict[str, float] = {}  # process -> when to restart it
        while not stopping():
            time.sleep(0.1)
            now = time.monotonic()
            for name, proc in list(self.processes.items()):
                if name in due:
                    if now >= due[name]:
                        del due[name]
                        self.restart(name)
                        started[name] = time.monotonic()
                        log(f"{name} restarted (pid {self.processes[name].pid})")
                    continue
                code = proc.poll()
                if code is None:
                    if now - started[name] > 60:
                        failures[name] = 0
                    continue
                failures[name] = failures.get(name, 0) + 1
                delay = min(0.25 * 2 ** (failures[name] - 1), 8.0)
                due[name] = now + delay
                log(f"{name} exited with code {code}; restarting in {delay:.2f} s (see {self.log_path(name)})")

    def stop(self) -> None:
        """Stop every process, newest first, each with SIGTERM and then, if it lingers, SIGKILL."""
        for name in reversed(list(self.processes)):
            self._terminate(name)
        for log in self._logs.values():
            log.close()
        self._logs.clear()

    def kill(self, name: str) -> None:
        """SIGKILL, as a crash would."""
        proc = self.processes[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def restart(self, name: str, extra_args: tuple[str, ...] = ()) -> None:
        """Start `name` again with its command, plus `extra_args` for this start only."""
        if self.processes[name].poll() is None:
            self._terminate(name)
        command, env = self._commands[name]
        self._spawn(name, command + list(extra_args), env)
        self._commands[name] = (command, env)

    def _terminate(self, name: str) -> None:
        proc = self.processes[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def _spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> None:
        log = self._logs.get(name)
        if log is None or log.closed:
            log = self._logs[name] = open(self.log_path(name), "ab")  # noqa: SIM115 (closed in stop)
        self._commands[name] = (command, env or {})
        # This checkout's code first on the path: the console scripts of a venv installed from another checkout
        # (editable) would otherwise run that one's, and a version checked out beside would be measured as this.
        path = os.pathsep.join(p for p in (str(SOURCE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        self.processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={
            **os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **(env or {})})

    def _wait(self, what: str, ready: object, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():  # type: ignore[operator]
                return
            dead = [n for n, p in self.processes.items() if p.poll() is not None]
            if dead:
                log = self.log_path(dead[0])
                tail = log.read_text(errors="replace").splitlines()[-8:] if log.exists() else []
                raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}; the end of {log}:\n"
                                   + "\n".join(tail))
            time.sleep(0.05)
        raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s; logs in {self.settings.work_dir / 'logs'}")
