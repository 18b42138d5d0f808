"""Controller HA: one leader at a time, a standby takes over, a deposed leader cannot write."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from redis.asyncio import Redis

from gateway_state import keys
from gateway_state.config_store import Deposed
from gateway_state.records import Config
from gateway_state.store import StateStore
from tests.client import wait_for
from tests.conftest import BIN, FIXTURES


async def test_the_lease_fences_a_deposed_leaders_writes(redis_client: Redis) -> None:
    store = StateStore(redis_client)
    a = await store.lead("a", 200)
    assert a == "a|1" and await store.lead("b", 200) == "a|1"  # held: b stands by
    await store.write_config(Config(1, {}, {}), a)
    await asyncio.sleep(0.3)  # a stops renewing, say paused by a long GC or a frozen VM
    b = await store.lead("b", 200)
    assert b == "b|2"
    with pytest.raises(Deposed):
        await store.write_config(Config(99, {}, {}), a)
    assert (await store.read_config()).generation == 1  # type: ignore[union-attr]
    assert await store.lead("a", 200) == "b|2"  # renewing does not take the lease back


def controller(i: int, manifests: Path, workdir: Path, redis_url: str) -> subprocess.Popen[bytes]:
    log = (workdir / f"c{i}.log").open("wb")
    return subprocess.Popen([str(BIN / "controller"), "--controller-id", f"c{i}", "--manifests", str(manifests),
                             "--envoy-config-dir", str(workdir / f"envoy{i}"), "--redis-url", redis_url,
                             "--resync-interval-ms", "200", "--leader-lease-ms", "3000"],
                            stdout=log, stderr=subprocess.STDOUT)


async def leader(redis: Redis) -> str | None:
    raw = await redis.get(keys.LEADER)
    return raw.decode() if raw else None


async def test_a_standby_takes_over_within_five_seconds_and_a_paused_leader_stays_deposed(
        redis_client: Redis, redis_url: str, tmp_path: Path) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    for path in (FIXTURES / "fleet").glob("*.yaml"):
        shutil.copy(path, manifests / path.name)
    procs = [controller(i, manifests, tmp_path, redis_url) for i in range(2)]
    try:
        deadline = time.monotonic() + 10
        while await redis_client.get(keys.CONFIG) is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        first = await leader(redis_client)
        assert first is not None
        old, standby = (0, 1) if first.startswith("c0|") else (1, 0)
        assert not (tmp_path / f"envoy{standby}" / "lds.json").exists()  # only the leader writes Envoy's files

        procs[old].send_signal(signal.SIGSTOP)  # frozen, not dead: it will wake up believing it leads
        stopped_at = time.monotonic()
        while (holder := await leader(redis_client)) in (None, first):
            assert time.monotonic() - stopped_at < 5.0, "no standby took over within 5 s"
            await asyncio.sleep(0.05)
        takeover_s = time.monotonic() - stopped_at
        assert holder.startswith(f"c{standby}|")
        await wait_for(lambda: (tmp_path / f"envoy{standby}" / "lds.json").exists(), 5.0)

        # Make the new leader's next write observable, then wake the old one.
        await redis_client.delete(keys.CONFIG)
        while await redis_client.get(keys.CONFIG) is None:
            await asyncio.sleep(0.05)
        procs[old].send_signal(signal.SIGCONT)
        woken_at = time.monotonic()
        while f"standing by; the leader is {holder}" not in (tmp_path / f"c{old}.log").read_text():
            assert time.monotonic() - woken_at < 10, "the woken leader did not stand down"
            await asyncio.sleep(0.05)
        assert await leader(redis_client) == holder
        print(f"\nstandby took over {takeover_s:.2f} s after the leader froze")
    finally:
        for p in procs:
            p.send_signal(signal.SIGCONT)
            p.terminate()
            p.wait(10)
