"""`make up` heals itself: kill -9 a picker, Redis, the collector and the controller in turn under
steady traffic; each comes back, no request fails, and requests sharing a prefix keep their pod.

The fleet runs from a copy of examples/fleet with its listeners, pod addresses and
own ports moved (`FLEET_ARGS=--port-base`), so it shares the machine with any other.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.client import QWEN, wait_for
from tests.conftest import free_port_block

ROOT = Path(__file__).parent.parent
GROUPS = 4


def descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every process below `pid`."""
    out: dict[int, str] = {}
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            try:
                out[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            todo.append(child)
    return out


class MakeUp:
    def __init__(self, work: Path) -> None:
        self.base = free_port_block(10)  # the fleet's own eight, then the two listeners
        self.port = self.base + 8
        manifests = work / "manifests"
        manifests.mkdir()
        net = f"127.{random.randrange(100, 250)}.{random.randrange(1, 250)}."
        for path in (ROOT / "examples" / "fleet").glob("*.yaml"):
            text = path.read_text().replace("port: 8080", f"port: {self.port}")
            text = text.replace("port: 8081", f"port: {self.base + 9}").replace("127.0.0.1", net + "1")
            (manifests / path.name).write_text(text)
        args = f"--manifests {manifests} --work-dir {work / 'fleet'} --port-base {self.base}"
        self.log = (work / "make-up.log").open("wb")
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        self.proc = subprocess.Popen(["make", "-s", "up", f"FLEET_ARGS={args}"], cwd=ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.log_path = work / "make-up.log"

    def pid_of(self, marker: str) -> int | None:
        found = [pid for pid, cmd in descendants(self.proc.pid).items() if marker in cmd]
        return found[0] if found else None

    def stop(self) -> int:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            self.log.close()


@pytest.fixture
def make_up(tmp_path: Path) -> Iterator[MakeUp]:
    if shutil.which("make") is None:
        pytest.fail("make is not installed")
    fleet = MakeUp(tmp_path)
    try:
        yield fleet
    finally:
        fleet.stop()


async def test_make_up_restarts_what_dies_and_keeps_serving(make_up: MakeUp) -> None:
    url = f"http://127.0.0.1:{make_up.port}/v1/chat/completions"
    systems = [f"group {g} shares this system prompt: " + " ".join(f"w{g}x{i}" for i in range(200))
               for g in range(GROUPS)]
    sent, failed = Counter[str](), Counter[str]()
    home: dict[int, Counter[str]] = {g: Counter() for g in range(GROUPS)}  # pods serving each group before any fault
    pods: dict[int, Counter[str]] = {g: Counter() for g in range(GROUPS)}  # and during the faults
    phase = ["warm-up"]
    stop = asyncio.Event()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        async def ready() -> bool:  # supervising (the hints are printed), and serving through the pickers
            if "The fleet is up" not in make_up.log_path.read_text():
                return False
            try:
                async with http.post(url, json={"model": QWEN, "max_tokens": 1,
                                                "messages": [{"role": "user", "content": "up?"}]}) as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await wait_for(ready, 180)

        async def user(g: int, u: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                body = {"model": QWEN, "max_tokens": 4, "messages": [
                    {"role": "system", "content": systems[g]}, {"role": "user", "content": f"user {u} turn {n}"}]}
                name = phase[0]
                sent[name] += 1
                try:
                    async with http.post(url, json=body) as r:
                        await r.read()
                        if r.status != 200:
                            failed[name] += 1
                        else:
                            (home if name == "warm-up" else pods)[g][r.headers.get("x-inference-pod", "?")] += 1
                except (aiohttp.ClientError, TimeoutError):
                    failed[name] += 1
                await asyncio.sleep(0.02)

        users = [asyncio.create_task(user(g, u)) for g in range(GROUPS) for u in range(2)]
        await asyncio.sleep(3.0)
        faults = [("picker", f"--grpc-address 127.0.0.1:{make_up.base + 1}"),
                  ("redis", f"redis-server 127.0.0.1:{make_up.base}"),
                  ("collector", "--collector-id collector-0"), ("controller", "--controller-id controller-0")]
        restarted = {}
        for name, marker in faults:
            phase[0] = name
            victim = make_up.pid_of(marker)
            assert victim is not None, (name, descendants(make_up.proc.pid))
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            await wait_for(lambda m=marker, v=victim: make_up.pid_of(m) not in (None, v), 30)
            restarted[name] = time.monotonic() - killed
            await asyncio.sleep(4.0)
        stop.set()
        await asyncio.gather(*users)

    # A group's home: the two pods that served most of it before any fault (its two users' requests run at
    # once, and load may spread them over two of the four pods), not any pod it ever touched. Where the
    # warm-up kept a group on one pod, its second is the one that served it most during the faults, and
    # the group is held to that pair. Without prefix affinity each group would use all four.
    homes = {g: [pod for pod, _ in c.most_common(2)] for g, c in home.items()}
    for g, c in pods.items():
        homes[g] += [pod for pod, _ in c.most_common() if pod not in homes[g]][:2 - len(homes[g])]
    settled = sum(n for g, c in home.items() for pod, n in c.items() if pod in homes[g]) / sum(
        c.total() for c in home.values())
    on_home = sum(n for g, c in pods.items() for pod, n in c.items() if pod in homes[g])
    kept = on_home / sum(c.total() for c in pods.values())
    print("\nfault        sent  failed  restarted after")
    for name, _ in faults:
        print(f"{name:<11} {sent[name]:5d} {failed[name]:7d} {restarted[name]:10.2f} s")
    print(f"requests on their prefix group's two pods: {settled:.3f} before the faults, {kept:.3f} during them")
    assert make_up.proc.poll() is None, make_up.log_path.read_text()[-2000:]
    assert sum(failed.values()) == 0, (failed, sent)
    assert settled >= 0.9 and kept >= 0.95, (settled, kept, home, pods)
    log = make_up.log_path.read_text()
    assert all(n in log for n in ("picker-0 exited", "redis exited", "collector-0 exited", "controller-0 exited"))
