"""Routing survives Redis flushes, picker restarts and crashes, and manifest changes, with no Envoy restart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from redis.exceptions import RedisClusterException, RedisError

from gateway_state import keys
from gateway_state.lifecycle import connect
from local_fleet.fleet import Fleet
from tests.client import Reply, chat, post, wait_for
from tests.conftest import CLOSED_PORT, DEFAULT_PORT, EXTRA_PORT, PREFIX_PORT


@pytest.fixture
async def http(fleet: Fleet) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def steady_load(http: aiohttp.ClientSession, seconds: float, fault: Callable[[], object],
                      fault_at_s: float = 0.5, port: int = PREFIX_PORT) -> list[Reply]:
    """Requests from 4 concurrent clients for `seconds`; `fault` runs once at `fault_at_s`."""
    deadline = time.monotonic() + seconds
    replies: list[Reply] = []

    async def client(n: int) -> None:
        i = 0
        while time.monotonic() < deadline:
            replies.append(await post(http, port, chat(f"client {n} turn {i}", max_tokens=4)))
            i += 1

    async def inject() -> None:
        await asyncio.sleep(fault_at_s)
        result = fault()
        if asyncio.iscoroutine(result):
            await result

    await asyncio.gather(*(client(n) for n in range(4)), inject())
    return replies


def redis_processes(fleet: Fleet) -> list[str]:
    """The fleet's Redis processes: the one standalone server, or every Cluster node."""
    return [f"redis-{p}" for p in fleet.settings.redis_cluster_ports] or ["redis"]


def controller_log(fleet: Fleet) -> str:
    return fleet.log_path("controller-0").read_text()


async def test_flushall_breaks_no_request(http: aiohttp.ClientSession, fleet: Fleet) -> None:
    redis = connect(fleet.redis_url)
    try:
        replies = await steady_load(http, 3.0, redis.flushall)
        assert len(replies) > 20
        assert [r.status for r in replies if r.status != 200] == []
        # The controller refills the config within one resync interval (300 ms here).
        started = time.monotonic()
        while not await redis.exists(keys.CONFIG):
            assert time.monotonic() - started < 2.0
            await asyncio.sleep(0.05)
        assert await redis.exists(keys.load("default/prefix-pool"))  # collectors republish too
    finally:
        await redis.aclose()


async def test_restarting_a_picker_breaks_no_request(http: aiohttp.ClientSession, fleet: Fleet) -> None:
    replies = await steady_load(http, 4.0, lambda: fleet.restart("picker-0"))
    assert len(replies) > 20
    assert [r.status for r in replies if r.status != 200] == []
    await wait_for(lambda: envoy_sees_every_picker_healthy(http, fleet), 10.0)


async def picker_ready(http: aiohttp.ClientSession, fleet: Fleet, index: int) -> bool:
    try:
        async with http.get(f"http://127.0.0.1:{fleet.settings.picker_metrics_ports[index]}/healthz") as r:
            return r.status == 200
    except aiohttp.ClientConnectionError:
        return False


async def envoy_sees_every_picker_healthy(http: aiohttp.ClientSession, fleet: Fleet) -> bool:
    async with http.get(f"http://127.0.0.1:{fleet.settings.envoy_admin_port}/clusters") as r:
        flags = [line.rsplit("::", 1)[1] for line in (await r.text()).splitlines()
                 if line.startswith("picker::") and "::health_flags::" in line]
    return len(flags) == len(fleet.settings.picker_ports) and all(f == "healthy" for f in flags)


async def picker_streams(http: aiohttp.ClientSession, fleet: Fleet) -> dict[str, int]:
    """Envoy's count of ext_proc streams per picker replica."""
    async with http.get(f"http://127.0.0.1:{fleet.settings.envoy_admin_port}/clusters") as r:
        return {line.split("::")[1]: int(line.rsplit("::", 1)[1]) for line in (await r.text()).splitlines()
                if line.startswith("picker::") and "::rq_total::" in line}


async def envoy_sends_to_every_picker(http: aiohttp.ClientSession, fleet: Fleet, port: int = PREFIX_PORT,
                                      model: str | None = None) -> bool:
    """Envoy spreads new streams over every replica. Seen on Envoy 1.40: for a few seconds after its
    health checks pass on both, its workers still send every stream to the first one."""
    before = await picker_streams(http, fleet)
    for _ in range(2):
        await post(http, port, chat("spread", max_tokens=1) if model is None else chat("spread", model=model,
                                                                                        max_tokens=1))
    after = await picker_streams(http, fleet)
    return len(after) == len(fleet.settings.picker_ports) and all(n > before.get(h, 0) for h, n in after.items())


async def test_a_crashed_picker_costs_only_the_streams_it_was_serving(http: aiohttp.ClientSession,
                                                                      fleet: Fleet) -> None:
    # kill -9: the streams in progress on it fail and their requests fall back to the pool's
    # failure mode. Envoy then takes it out on its first failure (outlier detection ejects on one
    # local-origin failure: a reset stream or a refused connection), and a stream it opens to it
    # meanwhile is refused and retried on the other replica, before the health checks notice.
    counters = (r"ext_proc\..*failure_mode_allowed", "cluster.picker.upstream_rq_retry_success",
                "cluster.picker.outlier_detection.ejections_enforced_total")
    before: list[int] = []
    await wait_for(lambda: envoy_sees_every_picker_healthy(http, fleet), 10.0)  # the other must take over
    await wait_for(lambda: envoy_sends_to_every_picker(http, fleet), 20.0)  # and the one killed has streams

    def crash() -> None:
        before.extend(fleet.envoy_counter(name) for name in counters)
        fleet.kill("picker-1")

    replies = await steady_load(http, 3.0, crash)
    failed, retried, ejected = [fleet.envoy_counter(name) - b for name, b in zip(counters, before, strict=True)]
    fleet.restart("picker-1")
    assert len(replies) > 20
    assert [r.status for r in replies if r.status != 200] == []
    assert failed <= 4, f"{failed} streams failed; the 4 clients had at most 4 in progress at the kill"
    # Taken out at once: ejected on its first failure, a stream sent meanwhile retried elsewhere.
    assert ejected > 0 or retried > 0, (ejected, retried)
    await wait_for(lambda: picker_ready(http, fleet, 1), 10.0)


async def test_a_new_listener_goes_live_without_restarting_envoy(http: aiohttp.ClientSession, fleet: Fleet) -> None:
    envoy_pid = fleet.processes["envoy"].pid
    extra: Path = fleet.settings.manifests_dir / "extra-listener.yaml"
    extra.write_text(f"""
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: extra-gateway
spec:
  gatewayClassName: test-class
  listeners:
  - name: extra
    protocol: HTTP
    port: {EXTRA_PORT}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: extra-route
spec:
  parentRefs:
  - name: extra-gateway
  rules:
  - backendRefs:
    - name: prefix-pool
      kind: InferencePool
""")
    try:
        reply: Reply | None = None
        for _ in range(100):
            try:
                reply = await post(http, EXTRA_PORT, chat("through the new listener"))
                break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.1)
        assert reply is not None and reply.status == 200 and reply.pod and reply.pod.startswith("prefix-")
        assert fleet.processes["envoy"].pid == envoy_pid and fleet.processes["envoy"].poll() is None
    finally:
        extra.unlink()


async def test_an_invalid_manifest_keeps_the_last_good_config(http: aiohttp.ClientSession, fleet: Fleet) -> None:
    bad: Path = fleet.settings.manifests_dir / "zz-broken.yaml"
    bad.write_text("""
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferencePool
metadata:
  name: broken-pool
spec:
  selector:
    app: prefix-pods
""")
    expected = "zz-broken.yaml document 1 (InferencePool broken-pool): spec.targetPortNumber: is required"
    try:
        await wait_for(lambda: expected in controller_log(fleet), 5.0)
        reply = await post(http, PREFIX_PORT, chat("the last good config still routes"))
        assert reply.status == 200
    finally:
        bad.unlink()
    await wait_for(lambda: "manifests are valid again" in controller_log(fleet), 5.0)
    assert (await post(http, PREFIX_PORT, chat("and after the fix"))).status == 200


async def test_redis_dying_under_load_breaks_no_request(http: aiohttp.ClientSession, fleet: Fleet) -> None:
    # A Cluster without replicas: one master dies, its slots go, and the cluster stops answering after its
    # node timeout (2 s) until the node is back.
    victim = redis_processes(fleet)[-1]
    try:
        replies = await steady_load(http, 3.0, lambda: fleet.kill(victim))
    finally:  # back for the tests after this one, whatever this one finds
        # Redis comes back empty; the controller and collector refill it and pickers resume shared scoring.
        fleet.restart(victim)
    assert len(replies) > 20
    assert [r.status for r in replies if r.status != 200] == []
    redis = connect(fleet.redis_url)
    try:
        async def refilled() -> bool:
            try:
                return bool(await redis.exists(keys.CONFIG) and await redis.exists(keys.load("default/prefix-pool")))
            except (RedisError, RedisClusterException):  # a restarted node listens a moment later
                return False

        await wait_for(refilled, 15.0 if fleet.settings.redis_cluster_ports else 5.0)
        reply = await post(http, PREFIX_PORT, chat("after the outage"))
        assert reply.status == 200
        await wait_for(lambda: redis.exists(keys.pickers("default/prefix-pool")), 5.0)
    finally:
        await redis.aclose()


async def test_with_every_picker_down_pools_fail_open_or_closed(http: aiohttp.ClientSession, fleet: Fleet) -> None:
    for name in ("picker-0", "picker-1"):
        fleet.kill(name)  # waits until the process is gone
    try:
        # Failing open, the body goes unchanged: a model name the pods serve, not an alias.
        opened = await post(http, DEFAULT_PORT, chat("fail open"))
        assert opened.status == 200 and opened.pod and opened.pod.startswith("default-")
        closed = await post(http, CLOSED_PORT, chat("fail closed", model="qwen-closed"))
        assert closed.status == 503
        assert closed.json()["error"]["type"] == "ServiceUnavailableError"
    finally:
        for name in ("picker-0", "picker-1"):
            fleet.restart(name)
        fleet.wait_pickers_routable()  # ready, and Envoy's admin reports them healthy again

    async def picked_again() -> bool:  # Envoy's workers learn the health a moment after its admin does
        return (await post(http, CLOSED_PORT, chat("picked again", model="qwen-closed"))).status == 200

    await wait_for(picked_again, 5.0)


async def test_a_stalled_redis_does_not_stall_decisions(http: aiohttp.ClientSession, fleet: Fleet) -> None:
    nodes = [connect(f"redis://127.0.0.1:{p}/0") for p in fleet.settings.redis_cluster_ports] or \
        [connect(fleet.redis_url)]
    try:
        async def stall() -> None:  # Redis (every node of a Cluster) answers nothing for 1.5 s
            await asyncio.gather(*(node.execute_command("DEBUG", "SLEEP", "1.5") for node in nodes))

        started = time.monotonic()
        replies, latencies = [], []

        async def timed() -> None:
            while time.monotonic() - started < 2.5:
                t = time.monotonic()
                replies.append(await post(http, PREFIX_PORT, chat("during the stall", max_tokens=2)))
                latencies.append(time.monotonic() - t)

        await asyncio.gather(stall(), *(timed() for _ in range(4)))
    finally:
        for node in nodes:
            await node.aclose()
    assert [r.status for r in replies if r.status != 200] == []
    # Deadlines of 20 ms per request-path call: no request waits out the 1.5 s stall.
    assert max(latencies) < 0.75, max(latencies)


async def test_a_crashed_pickers_inflight_counts_expire_and_its_requests_finish(
        http: aiohttp.ClientSession, fleet: Fleet) -> None:
    redis = connect(fleet.redis_url)
    victim = None
    try:
        long = [asyncio.create_task(post(http, PREFIX_PORT, chat(f"long {i}", max_tokens=2000, stream=True)))
                for i in range(8)]

        async def some_replica_routed() -> bool:  # Envoy decides which replicas get the streams
            nonlocal victim
            for i in (0, 1):
                if await redis.hgetall(keys.inflight("default/prefix-pool", f"picker-{i}")):
                    victim = i
                    return True
            return False

        await wait_for(some_replica_routed, 5.0)
        fleet.kill(f"picker-{victim}")
        killed_at = time.monotonic()
        # The requests it routed are already at their pods and run to the end.
        assert all(r.status == 200 and r.text.rstrip().endswith("data: [DONE]") for r in await asyncio.gather(*long))

        async def expired() -> bool:
            return not await redis.exists(keys.inflight("default/prefix-pool", f"picker-{victim}"))

        await wait_for(expired, 8.0)
        print(f"\npicker-{victim}'s in-flight counts expired {time.monotonic() - killed_at:.1f} s after kill -9")
    finally:
        await redis.aclose()
        if victim is not None:
            fleet.restart(f"picker-{victim}")
            await wait_for(lambda: picker_ready(http, fleet, victim), 10.0)
