"""Flow control through real Envoy, Redis, two picker replicas and simulated pods.

A pool of two pods running two sequences each (a tiny batch), saturated once each
pod has one request waiting: the simulator's synthetic sequences fill it until the
test lets them go (all four batch slots open at once), then:
- Critical requests go before Standard ones queued earlier, whichever replica each
  waits at (Envoy spreads the ext_proc streams over both), and waits longer than
  Envoy's usual 2 s picker timeout are held, not cut;
- an InferenceObjective's priority (header) drives the same order, and a negative
  one, like Sheddable, is refused 429 at once;
- a request past its time-to-live gets an OpenAI-shaped 503;
- a client that goes away leaves the shared queue at once.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from gateway_state import keys
from local_fleet.fleet import Fleet, FleetSettings
from tests.client import wait_for
from tests.conftest import free_port, own_net
from tests.test_resilience import envoy_sends_to_every_picker

NET = own_net(20, 120)
PORT = free_port()
POOL = "default/fc-pool"
BASE = "/models/Qwen3-32B"


def manifests() -> str:
    pods = "".join(f"""---
apiVersion: v1
kind: Pod
metadata: {{name: fc-{i}, labels: {{app: fc}}}}
status:
  phase: Running
  podIP: {NET}1.{i + 1}
  conditions: [{{type: Ready, status: "True"}}]
""" for i in range(2))
    models = "".join(f"""---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModel
metadata:
  name: {name}{annotations}
spec:
  modelName: {name}
  criticality: {criticality}
  poolRef: {{name: fc-pool}}
  targetModels: [{{name: {BASE}, weight: 1}}]
""" for name, criticality, annotations in (
        ("critical", "Critical", ""), ("standard", "Standard", ""), ("sheddable", "Sheddable", ""),
        ("impatient", "Standard", "\n  annotations: {inference-gateway.io/queue-ttl: 700ms}")))
    objectives = "".join(f"""---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {{name: {name}}}
spec:
  priority: {priority}
  poolRef: {{name: fc-pool}}
""" for name, priority in (("premium", 10), ("batch", -5)))
    return f"""apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: gateway}}
spec:
  listeners: [{{name: fc, protocol: HTTP, port: {PORT}}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: fc}}
spec:
  parentRefs: [{{name: gateway, sectionName: fc}}]
  rules: [{{backendRefs: [{{group: inference.networking.x-k8s.io, kind: InferencePool, name: fc-pool}}]}}]
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferencePool
metadata:
  name: fc-pool
  annotations:
    inference-gateway.io/saturation-waiting: "1"
    inference-gateway.io/queue-ttl: 30s
spec:
  targetPortNumber: 8000
  selector: {{app: fc}}
{pods}{models}{objectives}"""


@pytest.fixture(scope="module")
def fc_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    directory = tmp_path_factory.mktemp("fc-manifests")
    (directory / "all.yaml").write_text(manifests())
    fleet = Fleet(FleetSettings(
        manifests_dir=directory, work_dir=tmp_path_factory.mktemp("fc"), redis_port=free_port(),
        picker_ports=(free_port(), free_port()), picker_metrics_ports=(free_port(), free_port()),
        picker_admin_ports=(free_port(), free_port()), envoy_admin_port=free_port(), resync_interval_ms=300,
        simulator_args=("--max-num-seqs", "2"),
    ))
    try:
        fleet.start()
        asyncio.run(both_pickers_serving(fleet))
        yield fleet
    finally:
        fleet.stop()


async def both_pickers_serving(fleet: Fleet) -> None:
    async with aiohttp.ClientSession() as http:
        await wait_for(lambda: envoy_sends_to_every_picker(http, fleet, PORT, "standard"), 30)


@pytest.fixture
async def http(fc_fleet: Fleet) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


class Outcome:
    def __init__(self) -> None:
        self.status = 0
        self.first_token_at = 0.0  # monotonic
        self.answered_at = 0.0
        self.body: dict[str, object] = {}
        self.headers: dict[str, str] = {}


async def ask(http: aiohttp.ClientSession, model: str, max_tokens: int, headers: dict[str, str] | None = None,
              outcome: Outcome | None = None) -> Outcome:
    """One streamed chat request; notes when its first token (or its error) arrived."""
    out = outcome or Outcome()
    body = {"model": model, "messages": [{"role": "user", "content": f"{model} {random.random()}"}],
            "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    async with http.post(f"http://127.0.0.1:{PORT}/v1/chat/completions", json=body, headers=headers or {}) as r:
        out.status, out.headers = r.status, dict(r.headers)
        if r.status != 200:
            out.answered_at = time.monotonic()
            out.body = await r.json(content_type=None)
            return out
        async for line in r.content:
            if line.startswith(b"data: {") and not out.first_token_at:
                out.first_token_at = time.monotonic()
        out.answered_at = time.monotonic()
    return out


class Saturated:
    """Both pods' batches held full by the simulator's synthetic sequences (two running, one
    waiting at each), until `release`: the moment room opens is the test's, not a race with
    requests finishing."""

    def __init__(self, http: aiohttp.ClientSession, fleet: Fleet) -> None:
        self.http, self.fleet = http, fleet
        self.pods = [f"http://{NET}1.{i + 1}:8000/sim/load" for i in range(2)]

    async def __aenter__(self) -> Saturated:
        for pod in self.pods:
            async with self.http.post(pod, json={"requests": 3, "prompt_tokens": 16, "max_tokens": 100_000}) as r:
                assert r.status == 200
        try:
            await wait_for(self.seen_saturated, 10)
            # Nobody waits yet, and the pool is full: Sheddable traffic is refused at once.
            try:
                assert (await asyncio.wait_for(ask(self.http, "sheddable", 1), 5)).status == 429
            except TimeoutError:
                raise AssertionError(f"a Sheddable request was let in; the replicas see {await self.views()}") from None
        except BaseException:
            await self.release()
            raise
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.release()
        # Until every replica sees the room, so the next test's load is not judged by this one's samples.
        await wait_for(self.seen_room, 10)

    async def seen_room(self) -> bool:
        return not any(view["saturated"] for view in await self.views())

    async def seen_saturated(self) -> bool:
        """Every replica's view, from the pods' scraped queues."""
        return all(view["saturated"] for view in await self.views())

    async def views(self) -> list[dict[str, Any]]:
        headers = {"Authorization": f"Bearer {self.fleet.admin_tokens['read']}"}
        views = []
        for port in self.fleet.settings.picker_admin_ports:
            async with self.http.get(f"http://127.0.0.1:{port}/admin/pools/default/fc-pool/queue",
                                     headers=headers) as r:
                views.append(await r.json())
        return views

    async def release(self) -> None:
        for pod in self.pods:
            async with self.http.delete(pod) as r:
                assert r.status == 200


async def queued(fleet: Fleet, n: int) -> None:
    """Until the fleet's shared queue holds `n` requests."""
    redis = Redis.from_url(fleet.redis_url)
    try:
        async def holds() -> bool:
            return int(await redis.zcard(keys.queue(POOL))) == n
        await wait_for(holds, 10)
    finally:
        await redis.aclose()


async def test_critical_requests_go_before_standard_ones_queued_earlier_across_replicas(
        http: aiohttp.ClientSession, fc_fleet: Fleet) -> None:
    async with Saturated(http, fc_fleet) as pool:
        sent = time.monotonic()
        standard = [asyncio.create_task(ask(http, "standard", 8)) for _ in range(4)]
        await queued(fc_fleet, 4)
        critical = [asyncio.create_task(ask(http, "critical", 8)) for _ in range(4)]
        await queued(fc_fleet, 8)
        # Held longer than Envoy's usual 2 s picker timeout: the timeout covers the TTL.
        await asyncio.sleep(max(0.0, 2.5 - (time.monotonic() - sent)))
        await pool.release()
        results = await asyncio.gather(*standard, *critical)
    assert all(r.status == 200 for r in results), [(r.status, r.body) for r in results]
    s, c = results[:4], results[4:8]
    # Four batch slots open at once: the four Critical requests take them.
    assert max(r.first_token_at for r in c) < min(r.first_token_at for r in s)
    assert min(r.first_token_at for r in s) - sent > 2.0
    # Both replicas held waiting requests (Envoy spreads the streams), and both let theirs through.
    assert await picker_metric(http, fc_fleet, "picker_flow_requests_total", outcome="dispatched",
                               each_replica=True) >= 1


async def test_objective_priority_orders_like_criticality_and_negative_is_refused_at_once(
        http: aiohttp.ClientSession, fc_fleet: Fleet) -> None:
    async with Saturated(http, fc_fleet) as pool:
        started = time.monotonic()
        batch = await ask(http, "standard", 8, {"x-gateway-inference-objective": "batch"})
        assert batch.status == 429 and batch.answered_at - started < 1.0
        assert batch.headers.get("Retry-After") == "1"
        error = batch.body["error"]
        assert isinstance(error, dict) and error["type"] == "RateLimitError" and "saturated" in error["message"]
        critical = [asyncio.create_task(ask(http, "critical", 8)) for _ in range(4)]
        await queued(fc_fleet, 4)
        # The newer header name, and a tenant of its own: priority 10 passes the Critical ones queued first.
        premium = [asyncio.create_task(ask(http, "standard", 8, {"x-llm-d-inference-objective": "premium",
                                                                "x-gateway-inference-fairness-id": "tenant-p"}))
                   for _ in range(4)]
        await queued(fc_fleet, 8)
        await pool.release()
        results = await asyncio.gather(*critical, *premium)
    assert all(r.status == 200 for r in results)
    # Four batch slots open at once: the four premium requests take them.
    assert max(r.first_token_at for r in results[4:]) < min(r.first_token_at for r in results[:4])


async def test_a_request_past_its_time_to_live_gets_an_openai_503(http: aiohttp.ClientSession,
                                                                   fc_fleet: Fleet) -> None:
    async with Saturated(http, fc_fleet):
        started = time.monotonic()
        late = await ask(http, "impatient", 8)
    waited = late.answered_at - started
    assert late.status == 503 and 0.6 < waited < 3.0, (late.status, waited)
    error = late.body["error"]
    assert isinstance(error, dict) and error["type"] == "ServiceUnavailableError"
    assert "waited 0.7 s" in str(error["message"])


async def test_a_client_that_goes_away_leaves_the_shared_queue_at_once(http: aiohttp.ClientSession,
                                                                       fc_fleet: Fleet) -> None:
    redis = Redis.from_url(fc_fleet.redis_url)
    try:
        async with Saturated(http, fc_fleet):
            leaving = asyncio.create_task(ask(http, "standard", 8))
            await queued(fc_fleet, 1)
            # Every replica's admin API shows the fleet's queue: one Standard request, no room.
            headers = {"Authorization": f"Bearer {fc_fleet.admin_tokens['read']}"}
            views = []
            for port in fc_fleet.settings.picker_admin_ports:
                async with http.get(f"http://127.0.0.1:{port}/admin/pools/default/fc-pool/queue",
                                    headers=headers) as r:
                    views.append(await r.json())
            for view in views:
                assert view["waiting"] == 1 and view["saturated"] and view["settings"]["saturation_waiting"] == 1
                assert [(p["priority"], p["waiting"]) for p in view["by_priority"]] == [(0, 1)]
            assert sum(len(v["this_replica"]) for v in views) == 1
            leaving.cancel()
            await asyncio.gather(leaving, return_exceptions=True)
            started = time.monotonic()
            await queued(fc_fleet, 0)
            assert time.monotonic() - started < 1.0
            assert int(await redis.hlen(keys.queue_tickets(POOL))) == 0
        assert await picker_metric(http, fc_fleet, "picker_flow_requests_total", outcome="cancelled") >= 1
    finally:
        await redis.aclose()


async def picker_metric(http: aiohttp.ClientSession, fleet: Fleet, name: str, each_replica: bool = False,
                        **labels: str) -> float:
    """The metric summed over both pickers; with each_replica, the smallest replica's sum."""
    sums = []
    for port in fleet.settings.picker_metrics_ports:
        total = 0.0
        async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
            for line in (await r.text()).splitlines():
                if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                    total += float(line.rsplit(" ", 1)[1])
        sums.append(total)
    return min(sums) if each_replica else sum(sums)

