"""Fixtures that run the real components: Redis, and the whole fleet behind Envoy."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis

from gateway_state.records import Config
from gateway_state.store import StateStore
from local_fleet.fleet import Fleet, FleetSettings

FIXTURES = Path(__file__).parent / "fixtures"
BIN = Path(sys.executable).parent

# Ports of the test fleet; the listeners are in tests/fixtures/fleet/gateway.yaml.
PREFIX_PORT, PLAIN_PORT, DEFAULT_PORT, CLOSED_PORT, GHOST_PORT = 18080, 18081, 18082, 18084, 18085


async def publish(store: StateStore, config: Config) -> None:
    """Write a config as a test controller holding the leader lease."""
    await store.write_config(config, await store.lead("test-controller", 60_000))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.fixture(scope="session", params=["redis", "redis-cluster"])
def fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Redis (standalone, or a 3-master Redis Cluster), simulated pods, controller, Envoy, a collector
    and two pickers, as real processes."""
    manifests = tmp_path_factory.mktemp("manifests")
    for path in (FIXTURES / "fleet").glob("*.yaml"):
        shutil.copy(path, manifests / path.name)
    settings = FleetSettings(
        manifests_dir=manifests, work_dir=tmp_path_factory.mktemp("fleet"), redis_port=free_port(),
        picker_ports=(free_port(), free_port()), picker_metrics_ports=(free_port(), free_port()),
        envoy_admin_port=free_port(), resync_interval_ms=300,
        redis_cluster_ports=free_cluster_ports(3) if request.param == "redis-cluster" else (),
        simulator_args=("--adapter", "adapter-a", "--adapter", "adapter-b"), absent_pods=("ghost-0",),
    )
    f = Fleet(settings)
    try:
        f.start()
        yield f
    finally:
        f.stop()
