"""Chaos under steady load: kill a picker, a collector, the controller leader, a pod and Redis in turn.

Bounded: one fleet on its own loopback addresses, five faults of about seven
seconds each. Prints, per fault, requests sent and failed and the prefix-cache
hit rate before, during and after it.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import aiohttp
import pytest

from benchmarks.driver import chat_once
from benchmarks.workloads import Conversation, SharedPrefixWorkload
from gateway_state import keys
from gateway_state.lifecycle import connect
from gateway_state.records import decode_load
from local_fleet.fleet import Fleet, FleetSettings
from tests.client import QWEN, wait_for
from tests.conftest import FIXTURES, free_port, own_net, relocated

PORT = free_port()  # the test fleet's prefix listener, moved so both fleets can coexist
LISTENERS = {18080: PORT, **{p: free_port() for p in range(18081, 18086)}}
NET = own_net(140, 250)  # apart from the suite fleet's network
DEAD_POD = "127.0.1.2:8000".replace("127.0.", NET)


@pytest.fixture(scope="module")
def chaos_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    manifests = tmp_path_factory.mktemp("chaos-manifests")
    for path in (FIXTURES / "fleet").glob("*.yaml"):
        (manifests / path.name).write_text(relocated(path.read_text(), LISTENERS, NET))
    fleet = Fleet(FleetSettings(
        manifests_dir=manifests, work_dir=tmp_path_factory.mktemp("chaos"), redis_port=free_port(),
        picker_ports=(free_port(), free_port()), picker_metrics_ports=(free_port(), free_port()),
        picker_admin_ports=(),
        envoy_admin_port=free_port(), resync_interval_ms=300, collectors=3, controllers=2, pod_per_process=True,
    ))
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.stop()


@dataclass
class Phase:
    sent: int = 0
    failed: int = 0
    counters: dict[str, tuple[float, float]] = field(default_factory=dict)  # pod -> (hits, queries) at start


async def pod_counters(http: aiohttp.ClientSession, pods: list[str]) -> dict[str, tuple[float, float]]:
    out = {}
    for pod in pods:
        try:
            async with http.get(f"http://{pod}/metrics", timeout=aiohttp.ClientTimeout(total=1)) as r:
                text = await r.text()
        except (aiohttp.ClientError, TimeoutError):
            continue
        values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith(("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"))}
        out[pod] = (values["vllm:prefix_cache_hits_total"], values["vllm:prefix_cache_queries_total"])
    return out


def phase_hit_rate(start: dict[str, tuple[float, float]], end: dict[str, tuple[float, float]]) -> float:
    hits = queries = 0.0
    for pod, (h1, q1) in end.items():
        h0, q0 = start.get(pod, (0.0, 0.0))
        if q1 >= q0:  # a restarted pod counts from zero again
            hits, queries = hits + h1 - h0, queries + q1 - q0
    return hits / queries if queries else 0.0


class Load:
    """Conversations from a seeded workload, restarted when they run out of turns."""

    def __init__(self, http: aiohttp.ClientSession) -> None:
        self.http = http
        self.phase = Phase()
        self.workload = SharedPrefixWorkload(groups=4, users=3, turns=6, system_words=600, question_words=30,
                                             max_tokens=8)
        self.failures: list[float] = []  # when each failed request started

    async def run(self, stop: asyncio.Event) -> None:
        async def user(conv: Conversation) -> None:
            while not stop.is_set():
                fresh = Conversation(conv.group, conv.user, conv.system, conv.questions)
                for question in fresh.questions:
                    if stop.is_set():
                        return
                    fresh.messages.append({"role": "user", "content": question})
                    result = await chat_once(self.http, f"http://127.0.0.1:{PORT}/v1/chat/completions", QWEN,
                                             fresh, self.workload.max_tokens)
                    self.phase.sent += 1
                    if not result.ok:
                        self.phase.failed += 1
                        self.failures.append(result.finished_at - result.latency_s)

        await asyncio.gather(*(user(c) for c in self.workload.conversations()))


@pytest.fixture
async def load(chaos_fleet: Fleet) -> AsyncIterator[Load]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        yield Load(http)


async def test_chaos(chaos_fleet: Fleet, load: Load) -> None:
    fleet = chaos_fleet
    pods = list(fleet.pods())
    redis = connect(fleet.redis_url)

    async def leader() -> str:
        return (await redis.get(keys.LEADER)).decode().split("|")[0]

    async def kill_leader() -> None:
        fleet.kill(await leader())

    async def pod_excluded() -> float:
        """Seconds from the pod's death until its sample counts as failing (it leaves the candidates)."""
        killed = time.monotonic()
        while True:
            raw = await redis.hget(keys.load("default/prefix-pool"), DEAD_POD)
            if raw and decode_load(raw).consecutive_failures >= 3:
                return time.monotonic() - killed
            await asyncio.sleep(0.02)

    excluded: list[tuple[float, float]] = []  # (killed at, seconds until excluded)

    async def kill_pod() -> None:
        fleet.kill("pod-prefix-1")
        killed_at = time.monotonic()
        excluded.append((killed_at, await pod_excluded()))

    faults: list[tuple[str, Callable[[], Awaitable[None] | None], str]] = [
        ("picker", lambda: fleet.kill("picker-0"), "picker-0"),
        ("collector", lambda: fleet.kill("collector-0"), "collector-0"),
        ("controller leader", kill_leader, ""),
        ("model pod", kill_pod, "pod-prefix-1"),
        ("redis", lambda: fleet.kill("redis"), "redis"),
    ]
    stop = asyncio.Event()
    runner = asyncio.create_task(load.run(stop))
    rows = []
    try:
        async with aiohttp.ClientSession() as http:
            await asyncio.sleep(3.0)  # warm up: caches fill, every process settles
            for name, fault, restart in faults:
                phases = []
                for stage in ("before", "during", "after"):
                    load.phase = Phase(counters=await pod_counters(http, pods))
                    if stage == "during":
                        killed_leader = await leader() if name == "controller leader" else ""
                        result = fault()
                        if asyncio.iscoroutine(result):
                            await result
                        await asyncio.sleep(2.0)
                        fleet.restart(restart or killed_leader)
                        await asyncio.sleep(1.0)
                    else:
                        await asyncio.sleep(2.0)
                    phases.append((load.phase, phase_hit_rate(load.phase.counters, await pod_counters(http, pods))))
                rows.append((name, phases))
    finally:
        stop.set()
        await runner
        await redis.aclose()

    print("\nfault               sent  failed   hit before  hit during  hit after")
    for name, phases in rows:
        sent = sum(p.sent for p, _ in phases)
        failed = sum(p.failed for p, _ in phases)
        print(f"{name:<18} {sent:5d} {failed:7d} {phases[0][1]:12.3f} {phases[1][1]:11.3f} {phases[2][1]:10.3f}")
    killed_at, exclusion_s = excluded[0]
    print(f"the killed pod left the candidates {exclusion_s:.2f} s after it died")
    retried = fleet.envoy_counter("prefix-pool.upstream_rq_retry_success")
    print(f"requests Envoy moved to the next endpoint of the picker's list: {retried}")

    by_fault = {name: sum(p.failed for p, _ in phases) for name, phases in rows}
    assert by_fault["picker"] == by_fault["collector"] == by_fault["controller leader"] == by_fault["redis"] == 0
    assert exclusion_s < 1.0  # 3 failed scrapes at 100 ms; a dead pod refuses at once
    # Only requests already streaming from the pod when it died fail: every later one that was
    # routed to it before it left the candidates is refused and retried on the picker's fallback
    # (how many were depends on timing; some runs route none there in that window).
    assert all(t <= killed_at for t in load.failures), (killed_at, load.failures)


async def test_a_dead_pod_the_pickers_still_choose_costs_no_request(chaos_fleet: Fleet) -> None:
    """With the collectors stopped, nothing tells the pickers that a pod died, so they keep choosing it:
    each such request is refused before any byte and Envoy retries it on the next endpoint of the
    picker's list. None fails, and Envoy's retry counter shows the retries."""
    fleet = chaos_fleet
    collectors = [name for name in fleet.processes if name.startswith("collector-")]
    retries = "prefix-pool.upstream_rq_retry_success"
    url = f"http://127.0.0.1:{PORT}/v1/chat/completions"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        sent = 0

        async def chosen_again() -> bool:  # the pod the test before restarted is a candidate again
            nonlocal sent
            sent += 1
            warm = await chat_once(http, url, QWEN, Conversation(1, sent, f"warm-up {sent} " * 40, []), 2)
            return warm.pod == "prefix-1"

        await wait_for(chosen_again, 20.0)
    before = fleet.envoy_counter(retries)
    for name in collectors:
        fleet.processes[name].send_signal(signal.SIGSTOP)
    fleet.kill("pod-prefix-1")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            # Distinct prompts spread over the four pods by their prefix homes: a quarter go to the dead one.
            results = [await chat_once(http, url, QWEN, Conversation(0, i, f"conversation {i} " * 40, []), 2)
                       for i in range(40)]
    finally:
        for name in collectors:
            fleet.processes[name].send_signal(signal.SIGCONT)
        fleet.restart("pod-prefix-1")
    assert [r for r in results if not r.ok] == []
    assert fleet.envoy_counter(retries) - before > 0
