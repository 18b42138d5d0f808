"""In-flight counts heal themselves: client aborts and a Redis stall in the middle of load leave
nothing behind one heartbeat after the traffic stops, and a picker whose clock is minutes off
neither evicts the other replicas nor is evicted."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from gateway_state import keys
from gateway_state.lifecycle import connect
from local_fleet.fleet import Fleet
from picker.settings import StateSettings
from tests.client import chat, wait_for
from tests.conftest import BIN, PREFIX_PORT, free_port

POOLS = ("default/prefix-pool", "default/default-pool")
HEARTBEAT_S = StateSettings().heartbeat_interval_ms / 1000
LEASE_MS = StateSettings().inflight_lease_ms


@pytest.fixture
async def http(fleet: Fleet) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def picker_inflight(http: aiohttp.ClientSession, fleet: Fleet) -> float:
    total = 0.0
    for port in fleet.settings.picker_metrics_ports:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
            total += sum(float(line.rsplit(" ", 1)[1]) for line in (await r.text()).splitlines()
                         if line.startswith("picker_inflight_requests{"))
    return total


async def test_aborts_and_a_redis_stall_leave_no_count_behind(http: aiohttp.ClientSession, fleet: Fleet) -> None:
    redis = connect(fleet.redis_url)
    nodes = [connect(f"redis://127.0.0.1:{p}/0") for p in fleet.settings.redis_cluster_ports] or [redis]
    rng = random.Random(4)
    outcomes = {"completed": 0, "aborted": 0, "failed": 0}

    async def client(n: int) -> None:
        for i in range(12):
            body = chat(f"healing client {n} request {i} " * 20, max_tokens=rng.choice([4, 60, 400]), stream=True)
            abort_after = rng.choice([None, 0.0, 0.05, 0.3])
            try:
                async with http.post(f"http://127.0.0.1:{PREFIX_PORT}/v1/chat/completions", json=body) as r:
                    if abort_after is not None:
                        await asyncio.sleep(abort_after)
                        r.close()  # the client goes away mid-request
                        outcomes["aborted"] += 1
                        continue
                    await r.read()
                    # A stalled Redis must cost no request: the decision falls back to this replica's figures.
                    outcomes["completed" if r.status == 200 else "failed"] += 1
            except (aiohttp.ClientError, TimeoutError):
                outcomes["aborted"] += 1

    async def stall() -> None:
        await asyncio.sleep(1.0)
        # Redis answers nothing for 0.8 s: admissions and releases miss their deadlines or land late.
        await asyncio.gather(*(node.execute_command("DEBUG", "SLEEP", "0.8") for node in nodes))

    try:
        await asyncio.gather(stall(), *(client(n) for n in range(16)))
        stopped = time.monotonic()

        async def healed() -> bool:
            for pool in POOLS:
                for replica in ("picker-0", "picker-1"):
                    if any(int(v) for v in (await redis.hgetall(keys.inflight(pool, replica))).values()):
                        return False
            return await picker_inflight(http, fleet) == 0

        await wait_for(healed, HEARTBEAT_S + 1.0)  # one heartbeat, and a margin for a busy machine
        print(f"\n{outcomes}: in-flight counts back to 0 {time.monotonic() - stopped:.2f} s after the traffic")
    finally:
        await redis.aclose()
        for node in nodes:
            if node is not redis:
                await node.aclose()
    assert outcomes["aborted"] > 20 and outcomes["completed"] > 20 and outcomes["failed"] == 0, outcomes


@pytest.mark.parametrize("skew", ["+10m", "-10m"])
async def test_a_skewed_clock_neither_evicts_nor_is_evicted(fleet: Fleet, skew: str) -> None:
    faketime = shutil.which("faketime")
    assert faketime, "faketime is not installed (Debian package faketime)"
    redis = connect(fleet.redis_url)
    replica = "skewed-ahead" if skew.startswith("+") else "skewed-behind"
    log = fleet.log_path(replica).open("wb")
    proc = subprocess.Popen([faketime, "-f", skew, str(BIN / "picker"), "--no-secure-serving",
                             "--grpc-address", f"127.0.0.1:{free_port()}",
                             "--metrics-address", f"127.0.0.1:{free_port()}", "--replica-id", replica,
                             "--redis-url", fleet.redis_url], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # faketime forks the picker: stop the whole group
    try:
        async def members() -> dict[str, float]:
            rows = await redis.zrangebyscore(keys.pickers("default/prefix-pool"), "-inf", "+inf", withscores=True)
            return {m.decode(): score for m, score in rows}

        async def joined() -> bool:
            return replica in await members()

        await wait_for(joined, 15.0)
        for _ in range(3):  # three of everyone's heartbeats
            await asyncio.sleep(HEARTBEAT_S)
            seconds, micros = await redis.time()
            now_ms = int(seconds) * 1000 + int(micros) // 1000
            live = {m: s for m, s in (await members()).items() if s > now_ms}
            assert {"picker-0", "picker-1", replica} <= set(live), live
            # Leases run on Redis's clock, not on the skewed one.
            assert abs(live[replica] - (now_ms + LEASE_MS)) < 2 * HEARTBEAT_S * 1000 + 1000, (live, now_ms)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
        log.close()
        await redis.aclose()
