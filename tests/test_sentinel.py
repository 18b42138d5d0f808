"""Redis with Sentinel: the fleet's clients follow the master through a failover."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.exceptions import RedisError

from gateway_state.lifecycle import connect
from gateway_state.records import Config
from gateway_state.store import StateStore
from tests.conftest import BIN, free_port


@pytest.fixture
def sentinel_redis(tmp_path: Path) -> Iterator[tuple[str, dict[str, subprocess.Popen[bytes]]]]:
    """A master, one replica and three Sentinels (quorum 2), all on loopback."""
    master, replica = free_port(), free_port()
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def server(name: str, *args: str) -> None:
        procs[name] = subprocess.Popen([str(BIN / "redis-server"), *args], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)

    # Replication writes an RDB for the full sync: into the test's directory, not the working one.
    base = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    server("master", "--port", str(master), *base)
    server("replica", "--port", str(replica), "--replicaof", "127.0.0.1", str(master), *base)
    sentinels = [free_port() for _ in range(3)]
    for i, port in enumerate(sentinels):
        conf = tmp_path / f"sentinel-{i}.conf"
        conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                        f"sentinel monitor fleet 127.0.0.1 {master} 2\n"
                        "sentinel down-after-milliseconds fleet 1000\nsentinel failover-timeout fleet 5000\n")
        server(f"sentinel-{i}", str(conf), "--sentinel")
    # A failover needs every Sentinel to know the replica and its two peers; wait for that, not a guess.
    deadline = time.monotonic() + 30
    for port in sentinels:
        sentinel = redis.Redis(port=port)
        while True:
            try:
                if sentinel.sentinel_slaves("fleet") and len(sentinel.sentinel_sentinels("fleet")) == 2:
                    break
            except redis.RedisError:
                pass
            assert time.monotonic() < deadline, "the Sentinels did not discover the replica and each other"
            time.sleep(0.2)
        sentinel.close()
    yield "redis-sentinel://" + ",".join(f"127.0.0.1:{p}" for p in sentinels) + "/fleet", procs
    for proc in procs.values():
        proc.terminate()
        proc.wait(10)


async def test_the_store_follows_a_sentinel_failover(sentinel_redis) -> None:  # type: ignore[no-untyped-def]
    url, procs = sentinel_redis
    store = StateStore(connect(url, timeout_s=0.5))
    leadership = await store.lead("controller-a", 60_000)
    await store.write_config(Config(1, {}, {}, prefix_seed=5), leadership)
    assert await store.redis.execute_command("WAIT", 1, 5000) == 1  # the replica acknowledged the write

    procs["master"].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    config = None
    while config is None:
        assert time.monotonic() - killed < 20, "no failover within 20 s"
        try:
            config = await store.read_config()
        except (RedisError, OSError):
            await asyncio.sleep(0.2)
    print(f"\nreads served by the promoted replica {time.monotonic() - killed:.1f} s after the master died")
    assert config.prefix_seed == 5  # the replica had the data
    # Writes go to the new master; the lease and fencing work there too.
    assert await store.lead("controller-a", 60_000) == leadership
    await store.write_config(Config(2, {}, {}, prefix_seed=5), leadership)
    assert (await store.read_config()).generation == 2  # type: ignore[union-attr]
    await store.redis.aclose()
