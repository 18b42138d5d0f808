"""Fixtures that run the real components: Redis, and the whole fleet behind Envoy."""

from __future__ import annotations

import random
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import yaml
from redis.asyncio import Redis, RedisCluster

from gateway_state.records import Config
from gateway_state.store import StateStore
from local_fleet.fleet import (
    Fleet,
    FleetSettings,
    create_redis_cluster,
    free_cluster_ports,
    redis_cluster_node,
    redis_cluster_ok,
)
from testbed.kube import KubeAPIServer
from testbed.kube_admin import CHART_CRDS, Kube

FIXTURES = Path(__file__).parent / "fixtures"
GATEWAY_API_CRDS = FIXTURES / "kube" / "gateway-api-crds.yaml"
BIN = Path(sys.executable).parent

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free port, never one handed out before in this run (the kernel may offer a just-closed port
    again, and two processes of one fleet then collide)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


# The test fleet's listeners (tests/fixtures/fleet/gateway.yaml writes 18080-18085) and its pods'
# loopback network (127.0.x.y there) move to ports and addresses of this run's own, so two
# suites can share a machine.
PREFIX_PORT, PLAIN_PORT, DEFAULT_PORT, EXTRA_PORT, CLOSED_PORT, GHOST_PORT = (free_port() for _ in range(6))
_LISTENERS = dict(zip(range(18080, 18086), (PREFIX_PORT, PLAIN_PORT, DEFAULT_PORT, EXTRA_PORT, CLOSED_PORT,
                                            GHOST_PORT), strict=True))
POD_NET = f"127.{random.randrange(30, 140)}."


def own_net(first: int, last: int) -> str:
    """A loopback network "127.N." with first <= N < last for a test fleet of its own: never the
    suite fleet's (POD_NET), which runs for the whole session beside every other fleet."""
    return random.choice([f"127.{n}." for n in range(first, last) if f"127.{n}." != POD_NET])


def pod_address(fixture_address: str) -> str:
    """Where a pod the fixtures place at 127.0.x.y runs in this suite."""
    return fixture_address.replace("127.0.", POD_NET, 1)


def relocated(text: str, listeners: dict[int, int] | None = None, net: str = POD_NET) -> str:
    """A fixture manifest with its listener ports and pod network moved (see above)."""
    for old, new in (listeners or _LISTENERS).items():
        text = text.replace(f"port: {old}", f"port: {new}")
    return re.sub(r"\b127\.0\.(\d+\.\d+)", lambda m: net + m.group(1), text)


def prefix_pool_manifests(directory: Path, listen_port: int, net: str) -> Path:
    """The test fleet's prefix pool alone (its four pods, the InferencePool and the route to it), its
    listener on `listen_port` and its pods on the loopback network `net` ("127.N.")."""
    listeners = {18080: listen_port}
    for name in ("pods.yaml", "pools.yaml"):
        (directory / name).write_text(relocated((FIXTURES / "fleet" / name).read_text(), listeners, net))
    gateway = [d for d in yaml.safe_load_all((FIXTURES / "fleet" / "gateway.yaml").read_text()) if d]
    kept = [d for d in gateway if d["kind"] != "HTTPRoute" or d["metadata"]["name"] == "prefix-route"]
    (directory / "gateway.yaml").write_text(relocated(yaml.safe_dump_all(kept), listeners, net))
    return directory


async def publish(store: StateStore, config: Config) -> None:
    """Write a config as a test controller holding the leader lease."""
    await store.write_config(config, await store.lead("test-controller", 60_000))


# Fixtures that start the fleet's processes or a gateway (`e2e`), or that need the API server (`kube`).
E2E_FIXTURES = {"fleet", "chaos_fleet", "multi_fleet", "bypass_fleet", "affinity_fleet", "fc_fleet", "envoy_gateway",
                "drop_in", "make_up", "two_namespaces", "llama_fleet"}
KUBE_FIXTURES = {"kube", "kube_server", "chart_namespace", "two_namespaces"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & E2E_FIXTURES:
            item.add_marker(pytest.mark.e2e)
        if used & KUBE_FIXTURES:
            item.add_marker(pytest.mark.kube)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port_block(count: int) -> int:
    """The first of `count` consecutive free ports, below the kernel's ephemeral range."""
    for _ in range(200):
        base = random.randrange(20000, 32000 - count)
        if all(_bindable(p) for p in range(base, base + count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server of its own, for tests of the shared state."""
    port = free_port()
    proc = subprocess.Popen([str(BIN / "redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def redis_cluster_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A real Redis Cluster of three masters; the port of one of them."""
    ports = free_cluster_ports(3)
    procs = []
    for port in ports:
        data = tmp_path_factory.mktemp(f"redis-{port}")
        procs.append(subprocess.Popen(redis_cluster_node(port, data), stdout=subprocess.DEVNULL))
    try:
        for port in ports:
            client = redis.Redis(port=port)
            for _ in range(100):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
        create_redis_cluster(ports)
        deadline = time.monotonic() + 30
        while not redis_cluster_ok(ports) and time.monotonic() < deadline:
            time.sleep(0.1)
        yield ports[0]
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


@pytest.fixture(params=["redis", "redis-cluster"])
async def shared_redis(request: pytest.FixtureRequest) -> AsyncIterator[Redis | RedisCluster]:
    """An emptied client of a standalone Redis, then of a three-shard Redis Cluster (the pool's keys and its
    prefix index's on different shards)."""
    if request.param == "redis":
        client: Redis | RedisCluster = Redis.from_url(request.getfixturevalue("redis_url"))
    else:
        client = RedisCluster(host="127.0.0.1", port=request.getfixturevalue("redis_cluster_port"))
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture(scope="session", params=["redis", "redis-cluster"])
def fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Redis (standalone, or a 3-master Redis Cluster), simulated pods, controller, Envoy, a collector
    and two pickers, as real processes."""
    manifests = tmp_path_factory.mktemp("manifests")
    for path in (FIXTURES / "fleet").glob("*.yaml"):
        (manifests / path.name).write_text(relocated(path.read_text()))
    settings = FleetSettings(
        manifests_dir=manifests, work_dir=tmp_path_factory.mktemp("fleet"), redis_port=free_port(),
        picker_ports=(free_port(), free_port()), picker_metrics_ports=(free_port(), free_port()),
        picker_admin_ports=(free_port(), free_port()), collector_metrics_ports=(free_port(),),
        controller_metrics_ports=(free_port(),),
        envoy_admin_port=free_port(), resync_interval_ms=300,
        redis_cluster_ports=free_cluster_ports(3) if request.param == "redis-cluster" else (),
        # Steps at half the H100 fit: the same ratios, answers twice as fast.
        simulator_args=("--enable-lora", "--max-loras", "2", "--lora-modules", "adapter-a=/adapters/a",
                        "adapter-b=/adapters/b", "sql-lora=/adapters/sql", "tweet-summary=/adapters/tweet",
                        "--time-scale", "0.5"),
        absent_pods=("ghost-0",),
    )
    f = Fleet(settings)
    try:
        f.start()
        yield f
    finally:
        f.stop()


@pytest.fixture(scope="session")
def kube_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeAPIServer]:
    """A real etcd and kube-apiserver (RBAC on), with the chart's CRDs and Gateway API's installed."""
    server = KubeAPIServer(tmp_path_factory.mktemp("kube"))
    server.start()
    try:
        admin = Kube(server)
        admin.install_crds([*sorted(CHART_CRDS.glob("*.yaml")), GATEWAY_API_CRDS])
        admin.close()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def kube(kube_server: KubeAPIServer) -> Iterator[Kube]:
    client = Kube(kube_server)
    yield client
    client.close()
