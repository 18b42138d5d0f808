"""One decision, several destinations, through real Envoy, Redis, pickers and simulated pods.

- RequestMirror to an InferencePool: the picker places each copy in the mirror pool by that pool's
  strategy and state; a Service mirror (the seeds' form) is Envoy's round robin. Both copy every
  request, the client only sees the primary's answers, and the pool mirror keeps the mirror pool's
  prefix hit rate near the primary's where round robin loses it.
- Gateway API's mirror percent is honoured, and a saturated mirror pool drops copies, never the
  request.
- An SGLang prefill/decode pool (the seeds' InferenceTrafficPolicy): the prefill and decode pods get
  the same bootstrap room, the decode pod answers, prefix affinity holds on the prefill side, and a
  missing prefill or decode pod gives a clear OpenAI-shaped error with every count released.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from benchmarks.driver import chat_once
from benchmarks.workloads import Conversation, SharedPrefixWorkload
from local_fleet.fleet import Fleet, FleetSettings
from tests.client import QWEN, chat, post, wait_for
from tests.conftest import free_port, own_net

# Its own loopback network: not the suite fleet's, not the chaos fleet's (140 and up).
NET = own_net(20, 120)
PORTS = {name: free_port() for name in ("pool-mirror", "svc-mirror", "half-mirror", "pd", "pd-no-prefill",
                                        "pd-no-decode")}
ROLE = "rolebasedgroup.workloads.x-k8s.io/role"
# Small KV caches (192 blocks of 16 tokens): a pod holds a few groups' prompts, not all of them.
NUM_BLOCKS = 192


def _pods(app: str, subnet: int, count: int, labels: str = "", start: int = 1) -> str:
    return "".join(f"""---
apiVersion: v1
kind: Pod
metadata:
  name: {app}-{i}
  labels: {{app: {app}{labels}}}
status:
  phase: Running
  podIP: {NET}{subnet}.{start + i}
  conditions: [{{type: Ready, status: "True"}}]
""" for i in range(count))


def _pool(name: str, app: str, runtime: str = "vllm") -> str:
    return f"""---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferencePool
metadata:
  name: {name}
  annotations:
    inference.networking.x-k8s.io/routing-strategy: PREFIX_CACHE
    inference.networking.x-k8s.io/model-server-runtime: {runtime}
spec:
  targetPortNumber: 8000
  selector: {{app: {app}}}
"""


def _pd_policy(pool: str) -> str:
    # The seeds' PD policy, bootstrap port as the source document sets it.
    return f"""---
apiVersion: inferenceextension.alibabacloud.com/v1alpha1
kind: InferenceTrafficPolicy
metadata:
  name: {pool}-policy
spec:
  poolRef: {{name: {pool}}}
  modelServerRuntime: sglang
  profile:
    pd:
      trafficPolicy: {{prefixCache: {{mode: estimate}}}}
      prefillPolicyRef: prefixCache
      decodePolicyRef: prefixCache
      pdRoleLabelName: {ROLE}
      kvTransfer: {{bootstrapPort: 34000}}
"""


def _route(listener: str, pool: str, mirror: str = "") -> str:
    return f"""---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: {listener}
spec:
  parentRefs: [{{name: gateway, sectionName: {listener}}}]
  rules:
  - backendRefs:
    - {{group: inference.networking.x-k8s.io, kind: InferencePool, name: {pool}}}
{mirror}"""


def _mirror(kind: str, name: str, extra: str = "") -> str:
    port = "\n            port: 8000" if kind == "Service" else ""
    group = "" if kind == "Service" else "\n            group: inference.networking.x-k8s.io"
    return f"""    filters:
    - type: RequestMirror
      requestMirror:{extra}
        backendRef:
            kind: {kind}
            name: {name}{port}{group}
"""


def manifests() -> str:
    listeners = "".join(f"\n  - {{name: {name}, protocol: HTTP, port: {port}}}" for name, port in PORTS.items())
    return "".join([
        f"""apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata:
  name: test-class
spec:
  controllerName: inference.networking.x-k8s.io/gateway-controller
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: gateway
spec:
  gatewayClassName: test-class
  listeners:{listeners}
""",
        _pods("primary-a", 1, 3), _pool("primary-a", "primary-a"),
        _pods("mirror", 2, 3), _pool("mirror-pool", "mirror"),
        _pods("primary-b", 3, 3), _pool("primary-b", "primary-b"),
        _pods("rr", 4, 3), """---
apiVersion: v1
kind: Service
metadata:
  name: rr-svc
spec:
  selector: {app: rr}
  ports: [{port: 8000}]
""",
        _route("pool-mirror", "primary-a", _mirror("InferencePool", "mirror-pool")),
        _route("svc-mirror", "primary-b", _mirror("Service", "rr-svc")),
        _route("half-mirror", "primary-a", _mirror("InferencePool", "mirror-pool", "\n        percent: 50")),
        # SGLang PD: two prefill and two decode pods; two broken pools with one side absent.
        _pods("pd-prefill", 5, 2, f", {ROLE}: prefill"), _pods("pd-decode", 5, 2, f", {ROLE}: decode", start=11),
        _pool("pd-pool", "pd", "sglang").replace("selector: {app: pd}", "selector: {pd: one}"),
        _pd_policy("pd-pool"), _route("pd", "pd-pool"),
        _pods("ghost-prefill", 6, 1, f", {ROLE}: prefill"), _pods("lone-decode", 6, 1, f", {ROLE}: decode", start=11),
        _pool("pd-no-prefill", "x", "sglang").replace("selector: {app: x}", "selector: {pd: two}"),
        _pd_policy("pd-no-prefill"), _route("pd-no-prefill", "pd-no-prefill"),
        _pods("lone-prefill", 7, 1, f", {ROLE}: prefill"), _pods("ghost-decode", 7, 1, f", {ROLE}: decode", start=11),
        _pool("pd-no-decode", "x", "sglang").replace("selector: {app: x}", "selector: {pd: three}"),
        _pd_policy("pd-no-decode"), _route("pd-no-decode", "pd-no-decode"),
    ])


def _label_pd_pods(text: str) -> str:
    """The PD pools select their pods by a `pd` label of their own."""
    for prefix, value in (("pd-", "one"), ("ghost-prefill", "two"), ("lone-decode", "two"),
                          ("lone-prefill", "three"), ("ghost-decode", "three")):
        text = text.replace(f"labels: {{app: {prefix}", f"labels: {{pd: {value}, app: {prefix}")
    return text


@pytest.fixture(scope="module")
def multi_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    directory = tmp_path_factory.mktemp("multi-manifests")
    (directory / "all.yaml").write_text(_label_pd_pods(manifests()))
    fleet = Fleet(FleetSettings(
        manifests_dir=directory, work_dir=tmp_path_factory.mktemp("multi"), redis_port=free_port(),
        picker_ports=(free_port(), free_port()), picker_metrics_ports=(free_port(), free_port()),
        picker_admin_ports=(), envoy_admin_port=free_port(), resync_interval_ms=300,
        simulator_args=("--time-scale", "0.2", "--num-blocks", str(NUM_BLOCKS), "--bootstrap-timeout-s", "3"),
        absent_pods=("ghost-prefill-0", "ghost-decode-0"),
    ))
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture
async def http(multi_fleet: Fleet) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


def addresses(app: str, subnet: int, count: int, start: int = 1) -> list[str]:
    return [f"{NET}{subnet}.{start + i}:8000" for i in range(count)]


async def pod_metrics(http: aiohttp.ClientSession, pod: str) -> dict[str, float]:
    async with http.get(f"http://{pod}/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.split("{")[0].split(" ")[0], float(line.rsplit(" ", 1)[1])
            out[name] = out.get(name, 0.0) + value
    return out


async def totals(http: aiohttp.ClientSession, pods: list[str], *names: str) -> list[float]:
    per_pod = [await pod_metrics(http, p) for p in pods]
    return [sum(m.get(n, 0.0) for m in per_pod) for n in names]


async def picker_counter(http: aiohttp.ClientSession, fleet: Fleet, name: str, **labels: str) -> float:
    total = 0.0
    for port in fleet.settings.picker_metrics_ports:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
            for line in (await r.text()).splitlines():
                if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                    total += float(line.rsplit(" ", 1)[1])
    return total


async def run_workload(http: aiohttp.ClientSession, port: int, workload: SharedPrefixWorkload) -> int:
    """Every conversation turn by turn, the users of all groups at once; returns failed turns."""
    failed = 0

    async def user(conv: Conversation) -> None:
        nonlocal failed
        for question in conv.questions:
            conv.messages.append({"role": "user", "content": question})
            result = await chat_once(http, f"http://127.0.0.1:{port}/v1/chat/completions", QWEN, conv,
                                     workload.max_tokens)
            failed += not result.ok

    await asyncio.gather(*(user(c) for c in workload.conversations()))
    return failed


HIT_NAMES = ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total")


async def test_a_pool_mirror_keeps_the_mirror_pools_prefix_hits_and_round_robin_loses_them(
        http: aiohttp.ClientSession, multi_fleet: Fleet) -> None:
    workload = SharedPrefixWorkload(groups=8, users=2, turns=5, system_words=350, question_words=20, max_tokens=8)
    groups = {"pool": (addresses("primary-a", 1, 3), addresses("mirror", 2, 3), PORTS["pool-mirror"]),
              "service": (addresses("primary-b", 3, 3), addresses("rr", 4, 3), PORTS["svc-mirror"])}
    rates = {}
    for kind, (primary, mirror, port) in groups.items():
        before = [await totals(http, pods, *HIT_NAMES) for pods in (primary, mirror)]
        assert await run_workload(http, port, workload) == 0
        await asyncio.sleep(0.5)  # the last copies finish
        after = [await totals(http, pods, *HIT_NAMES) for pods in (primary, mirror)]
        (ph, pq), (mh, mq) = [(a[0] - b[0], a[1] - b[1]) for a, b in zip(after, before, strict=True)]
        assert mq >= 0.95 * pq, f"{kind} mirror saw {mq:.0f} of the primary's {pq:.0f} prompt tokens"
        rates[kind] = (ph / pq, mh / mq)
    print(f"\nprefix hit rate with a {NUM_BLOCKS}-block KV cache per pod, "
          f"{workload.groups} groups x {workload.users} users x {workload.turns} turns:")
    for kind, (primary_rate, mirror_rate) in rates.items():
        print(f"  {kind} mirror: primary {primary_rate:.3f}, mirror {mirror_rate:.3f}")
    pool_primary, pool_mirror = rates["pool"]
    _, service_mirror = rates["service"]
    # Each rate moves by up to 0.09 from run to run on this workload (primary 0.64 to 0.81, mirror 0.69 to
    # 0.81 over ten runs, on the code before and after the director), independently of the other: a bound
    # of 0.1 on their gap failed in two of eight loaded runs here. Round robin's copies stay near 0.33.
    assert pool_mirror >= pool_primary - 0.15
    assert service_mirror < pool_mirror - 0.15


async def test_the_client_sees_only_the_primarys_answers(http: aiohttp.ClientSession) -> None:
    primaries = {f"primary-a-{i}" for i in range(3)} | {f"primary-b-{i}" for i in range(3)}
    for port in (PORTS["pool-mirror"], PORTS["svc-mirror"]):
        for i in range(6):
            reply = await post(http, port, chat(f"whose answer is this {i}", max_tokens=4))
            assert reply.status == 200, reply.text
            assert reply.pod in primaries


async def test_the_mirror_percent_is_honoured(http: aiohttp.ClientSession, multi_fleet: Fleet) -> None:
    before = await picker_counter(http, multi_fleet, "picker_mirrors_total", pool="default/mirror-pool")
    for i in range(200):
        assert (await post(http, PORTS["half-mirror"], chat(f"half {i}", max_tokens=1))).status == 200
    copied = await picker_counter(http, multi_fleet, "picker_mirrors_total", pool="default/mirror-pool") - before
    assert 60 <= copied <= 140, copied  # 100 expected; 6 standard deviations apart


async def test_a_saturated_mirror_pool_drops_copies_not_requests(http: aiohttp.ClientSession,
                                                                  multi_fleet: Fleet) -> None:
    mirror_pods = addresses("mirror", 2, 3)
    for pod in mirror_pods:  # KV cache above the saturation threshold (0.8) on every mirror pod
        async with http.post(f"http://{pod}/sim/load", json={"requests": 8, "prompt_tokens": 240,
                                                             "max_tokens": 100_000}) as r:
            assert r.status == 200
    try:
        dropped = lambda: picker_counter(http, multi_fleet, "picker_mirrors_total",  # noqa: E731
                                         pool="default/mirror-pool", outcome="dropped")
        before = await dropped()

        async def shed() -> bool:
            reply = await post(http, PORTS["pool-mirror"], chat("while the mirror is full", max_tokens=2))
            assert reply.status == 200, reply.text
            return await dropped() > before

        await wait_for(shed, 5.0)
    finally:
        for pod in mirror_pods:
            async with http.delete(f"http://{pod}/sim/load") as r:
                assert r.status == 200


async def rooms(http: aiohttp.ClientSession, pods: list[str]) -> dict[str, set[int]]:
    out = {}
    for pod in pods:
        async with http.get(f"http://{pod}/sim/rooms") as r:
            out[pod] = {room["room"] for room in (await r.json())["rooms"]}
    return out


async def test_a_pd_pool_sends_each_request_to_a_prefill_and_a_decode_pod_with_one_room(
        http: aiohttp.ClientSession) -> None:
    prefill, decode = addresses("pd-prefill", 5, 2), addresses("pd-decode", 5, 2, start=11)
    systems = [f"System prompt of group {g}: " + " ".join(f"rule{g}x{i}" for i in range(80)) for g in range(2)]
    before_p = await rooms(http, prefill)
    before_d = await rooms(http, decode)
    cached_before = await totals(http, prefill, "sglang:cached_tokens_total", "sglang:prompt_tokens_total")
    for i in range(10):
        for g, system in enumerate(systems):
            conv = Conversation(g, i, system, [], [{"role": "system", "content": system},
                                                    {"role": "user", "content": f"question {i}"}])
            result = await chat_once(http, f"http://127.0.0.1:{PORTS['pd']}/v1/chat/completions", QWEN, conv, 4)
            assert result.ok, result
    new_p = {pod: r - before_p[pod] for pod, r in (await rooms(http, prefill)).items()}
    new_d = {pod: r - before_d[pod] for pod, r in (await rooms(http, decode)).items()}
    prefill_rooms = set().union(*new_p.values())
    decode_rooms = set().union(*new_d.values())
    assert len(decode_rooms) == 20 and decode_rooms == prefill_rooms
    cached, prompt = [a - b for a, b in zip(await totals(http, prefill, "sglang:cached_tokens_total",
                                                         "sglang:prompt_tokens_total"), cached_before, strict=True)]
    # Each group's prompt stays on one prefill pod: every request but each group's first hits it.
    assert cached / prompt > 0.75, (cached, prompt, {pod: sorted(r) for pod, r in new_p.items()})


async def test_a_pd_pool_answers_a_plain_request_and_streams(http: aiohttp.ClientSession) -> None:
    reply = await post(http, PORTS["pd"], chat("plain pd request", max_tokens=3))
    assert reply.status == 200, reply.text
    assert reply.pod.startswith("pd-decode-")
    body = json.dumps({"model": QWEN, "messages": [{"role": "user", "content": "stream it"}], "max_tokens": 3,
                       "stream": True})
    async with http.post(f"http://127.0.0.1:{PORTS['pd']}/v1/chat/completions", data=body,
                         headers={"content-type": "application/json"}) as r:
        assert r.status == 200
        assert (await r.text()).rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize(("listener", "message"), [
    ("pd-no-prefill", "KV cache transfer failed"),
    ("pd-no-decode", "The model server did not answer"),
])
async def test_a_missing_side_of_a_pd_pool_gives_a_clear_error_and_releases_both_counts(
        http: aiohttp.ClientSession, multi_fleet: Fleet, listener: str, message: str) -> None:
    reply = await post(http, PORTS[listener], chat("a request that cannot be served", max_tokens=2))
    assert reply.status == 503, reply.text
    error = json.loads(reply.text)["error"]
    assert error["code"] == 503 and message in error["message"]
    if listener == "pd-no-decode":  # Envoy retried the refused decode pod before answering 503
        assert multi_fleet.envoy_counter("pd-no-decode.upstream_rq_retry$") > 0
    # Both placements (prefill and decode) ended with the exchange: no replica counts either.
    async def released() -> bool:
        return await picker_counter(http, multi_fleet, "picker_inflight_requests", pool=f"default/{listener}") == 0

    await wait_for(released, 3.0)
