"""What a Redis with an append-only file (the embedded Redis of `make up`, a chart's Redis with persistence)
keeps across its restart: the prefix index and the heartbeats' in-flight figures, not each decision's
bookkeeping, which its replicas still get (gateway_state/scripts.py, `passing`)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway_state import keys
from gateway_state.placement_store import IndexWrite, Option, ReleaseWrite, SpeculativeWrite
from gateway_state.store import StateStore
from tests.conftest import BIN, free_port

POOL = "p"
PROMPT = [f"{i:016x}" for i in range(1, 9)]  # eight chained block hashes
SPECULATED = [f"{i:016x}" for i in range(101, 105)]


async def _serving(port: int) -> Redis:
    client = Redis(port=port)
    for _ in range(200):
        try:
            await client.ping()
            return client
        except RedisConnectionError:
            await asyncio.sleep(0.05)
    raise AssertionError(f"redis-server on {port} did not answer")


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(port: int, data: Path, *args: str) -> subprocess.Popen[bytes]:
        data.mkdir(exist_ok=True)
        proc = subprocess.Popen([str(BIN / "redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                                 "--save", "", "--dir", str(data), *args], stdout=subprocess.DEVNULL)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(10)


async def test_a_restarted_redis_keeps_the_index_and_the_heartbeats_figures_and_its_replica_gets_the_rest(
        servers: Callable[..., subprocess.Popen[bytes]], tmp_path: Path) -> None:
    primary_port, replica_port = free_port(), free_port()
    # Every write reaches the file before its reply, so a kill right after loses nothing the file should hold.
    persisted = ("--appendonly", "yes", "--appendfsync", "always")
    primary = servers(primary_port, tmp_path / "primary", *persisted)
    servers(replica_port, tmp_path / "replica", "--appendonly", "no", "--replicaof", "127.0.0.1", str(primary_port))
    redis, replica = await _serving(primary_port), await _serving(replica_port)
    store = StateStore(redis)
    try:
        await store.publish(POOL, "me", 60_000, {"10.0.0.1:8000": 1})  # a heartbeat: one request in flight
        placed = await store.admit(POOL, "me", [Option("10.0.0.2:8000", work_blocks=8)], 60_000,
                                   after=[IndexWrite("10.0.0.2:8000", PROMPT, 600_000, 1_000)])
        assert placed == 1
        await store.admit(POOL, "me", [Option("10.0.0.3:8000")], 60_000)
        await store.write(POOL, [ReleaseWrite("me", "10.0.0.3:8000"),
                                 SpeculativeWrite("10.0.0.4:8000", SPECULATED, 600_000,
                                                  keys.index_bucket(SPECULATED[0]))])
        before = await store.lookup(POOL, PROMPT)
        assert before.inflight == {"10.0.0.1:8000": 1, "10.0.0.2:8000": 1}
        assert before.matched_blocks == {"10.0.0.2:8000": len(PROMPT)}
        assert (await store.lookup(POOL, SPECULATED, speculative=True)).matched_blocks == {
            "10.0.0.4:8000": len(SPECULATED)}

        # The replica gets everything, the bookkeeping included: a failover keeps the figures.
        assert await redis.execute_command("WAIT", 1, 5_000) == 1
        total = {k.decode(): int(v) for k, v in (await replica.hgetall(keys.inflight_total(POOL))).items()}
        assert total == {"10.0.0.1:8000": 1, "10.0.0.2:8000": 1, "10.0.0.2:8000|work": 8}
        assert await replica.exists(keys.prefill_backlog(POOL))
        spec = keys.speculative_block(POOL, keys.index_bucket(SPECULATED[0]), SPECULATED[0])
        assert await replica.hexists(spec, "10.0.0.4:8000")

        await redis.aclose()
        primary.kill()
        primary.wait(10)
        servers(primary_port, tmp_path / "primary", *persisted)
        redis = await _serving(primary_port)
        store = StateStore(redis)
        after = await store.lookup(POOL, PROMPT)
        assert after.matched_blocks == before.matched_blocks  # the index came back from the file
        assert after.inflight == {"10.0.0.1:8000": 1}  # the last heartbeat's figures, not the admissions since
        assert after.prefill_backlog == {}
        assert (await store.lookup(POOL, SPECULATED, speculative=True)).matched_blocks == {}

        # The replica's next heartbeat writes its own figures again.
        await store.publish(POOL, "me", 60_000, {"10.0.0.1:8000": 1, "10.0.0.2:8000": 1})
        assert (await store.lookup(POOL, PROMPT)).inflight == {"10.0.0.1:8000": 1, "10.0.0.2:8000": 1}
    finally:
        await redis.aclose()
        await replica.aclose()
