"""Flow control under overload: about twice the pool's capacity, 20% Critical, 50% Standard, 30% Sheddable.

    .venv/bin/python -m benchmarks.overload
    .venv/bin/python -m benchmarks.overload --priority-reserve 0 --load 2.0 --duration-s 40

Two vLLM-flavoured simulated pods running 8 sequences each (`--max-num-seqs`, so
the batch fills long before the KV cache; time scale 2), two picker replicas behind
one Envoy, the pool with the given release rule and reserve for Critical. First the
pool's capacity is measured (completions per second with every request Standard and
flow control off, the pods kept full),
and the idle Critical TTFT (one request at a time). Then one seeded Poisson stream
at `--load` times the capacity, single-turn prompts of about 500 tokens and 128
generated tokens, goes through each router in turn, the pods restarted before each:
- ours: flow control with the queue shared in Redis;
- no flow control: the same pickers with `--no-flow-control` (Sheddable still refused
  when no endpoint has room, as before);
- per-replica queues: `--state local`, each replica with its own queue and its own
  in-flight counts, as the upstream picker keeps them.
Traffic classes: Critical from tenants c1 and c2, Standard from s1, s2 and s3 (50, 30
and 20% of it), Sheddable from d1 (fairness ids in the upstream header). Per router:
the Critical TTFT p90 against the idle one, Critical requests lost, what share of each
class was refused or expired, and fairness between the Standard tenants: 1 minus the
largest gap between a tenant's served requests and its max-min fair share of all the
Standard requests served (a tenant wanting less than an equal share gets all it
asks; the others split the rest equally). Writes bench/out/overload.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.routing import OUT, percentile
from local_fleet.fleet import Fleet, FleetSettings

NET = "127.0.71."
PORT = 8295
BASE = "/models/Qwen3-32B"
# (class, model, tenant, share of all traffic)
MIX = (("critical", "critical", "c1", 0.10), ("critical", "critical", "c2", 0.10),
       ("standard", "standard", "s1", 0.25), ("standard", "standard", "s2", 0.15),
       ("standard", "standard", "s3", 0.10), ("sheddable", "sheddable", "d1", 0.30))


def write_manifests(directory: Path, pods: list[str], queue_ttl_s: float, release_waiting: float,
                    reserve: int) -> None:
    docs = [f"""apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferencePool
metadata:
  name: overload
  annotations: {{inference-gateway.io/queue-ttl: {queue_ttl_s:g}s,
                inference-gateway.io/release-waiting: "{release_waiting:g}",
                inference-gateway.io/priority-reserve: "{reserve}"}}
spec:
  targetPortNumber: 8000
  selector: {{app: overload}}""",
            f"apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: overload}}\nspec:\n"
            f"  listeners: [{{name: ours, protocol: HTTP, port: {PORT}}}]",
            """apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: overload}
spec:
  parentRefs: [{name: overload}]
  rules: [{backendRefs: [{kind: InferencePool, name: overload}]}]"""]
    for name, criticality in (("critical", "Critical"), ("standard", "Standard"), ("sheddable", "Sheddable")):
        docs.append(f"apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceModel\n"
                    f"metadata: {{name: {name}}}\nspec: {{modelName: {name}, criticality: {criticality}, "
                    f"poolRef: {{name: overload}}, targetModels: [{{name: {BASE}, weight: 1}}]}}")
    for i, address in enumerate(pods):
        docs.append(f"apiVersion: v1\nkind: Pod\nmetadata: {{name: overload-{i}, labels: {{app: overload}}}}\n"
                    f"status: {{phase: Running, podIP: {address.split(':')[0]}}}")
    (directory / "overload.yaml").write_text("\n---\n".join(docs) + "\n")


@dataclass
class Sent:
    cls: str
    tenant: str
    status: int = 0
    ttft_s: float = 0.0


async def one(http: aiohttp.ClientSession, model: str, tenant: str, prompt: str, max_tokens: int,
              cls: str) -> Sent:
    sent = Sent(cls, tenant)
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True}
    started = time.monotonic()
    try:
        async with http.post(f"http://127.0.0.1:{PORT}/v1/chat/completions", json=body,
                             headers={"x-gateway-inference-fairness-id": tenant}) as r:
            sent.status = r.status
            async for line in r.content:  # the first chunk with text: servers send the role at once
                if not sent.ttft_s and line.startswith(b"data: {") and b'"content":"' in line.replace(b" ", b""):
                    delta = json.loads(line[6:])["choices"][0].get("delta", {})
                    if delta.get("content"):
                        sent.ttft_s = time.monotonic() - started
    except (TimeoutError, aiohttp.ClientError):
        sent.status = -1
    return sent


def prompts(count: int, seed: int) -> list[str]:
    words = random.Random(seed)
    return [" ".join(f"w{words.randrange(50_000)}" for _ in range(420)) for _ in range(count)]


async def capacity(duration_s: float, concurrency: int, max_tokens: int, seed: int) -> float:
    """Completions per second with the pods kept full (a closed loop of Standard requests)."""
    texts = prompts(4 * concurrency, seed)
    done = 0
    deadline = time.monotonic() + duration_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
        async def worker(i: int) -> None:
            nonlocal done
            while time.monotonic() < deadline:
                r = await one(http, "standard", "probe", texts[(i + done) % len(texts)], max_tokens, "standard")
                done += r.status == 200
        started = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return done / (time.monotonic() - started)


async def idle_ttft_p90(count: int, seed: int) -> float:
    """Critical requests one at a time on the idle pool (a few tokens each: the first one is what counts)."""
    texts = prompts(count, seed)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        ttfts = [(await one(http, "critical", "c1", t, 4, "critical")).ttft_s for t in texts]
    return percentile(ttfts, 0.9)


async def overload(qps: float, duration_s: float, max_tokens: int, seed: int) -> list[Sent]:
    times = random.Random(seed)
    arrivals, at = [], 0.0
    while (at := at + times.expovariate(qps)) < duration_s:
        arrivals.append(at)
    kinds = random.Random(seed + 1).choices(MIX, weights=[m[3] for m in MIX], k=len(arrivals))
    texts = prompts(len(arrivals), seed + 2)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300),
                                     connector=aiohttp.TCPConnector(limit=0)) as http:
        start = time.monotonic()

        async def send(at: float, kind: tuple[str, str, str, float], text: str) -> Sent:
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            return await one(http, kind[1], kind[2], text, max_tokens, kind[0])

        return await asyncio.gather(*(send(a, k, t) for a, k, t in zip(arrivals, kinds, texts, strict=True)))


def summary(results: list[Sent], idle_p90: float, duration_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {"requests": len(results),
                           "served_per_s": sum(r.status == 200 for r in results) / duration_s}
    for cls in ("critical", "standard", "sheddable"):
        mine = [r for r in results if r.cls == cls]
        ok = [r.ttft_s for r in mine if r.status == 200]
        out[cls] = {"sent": len(mine), "served": len(ok), "refused_429": sum(r.status == 429 for r in mine),
                    "expired_503": sum(r.status == 503 for r in mine),
                    "other_failures": sum(r.status not in (200, 429, 503) for r in mine),
                    "ttft_p50_s": percentile(ok, 0.5), "ttft_p90_s": percentile(ok, 0.9)}
    out["critical"]["p90_vs_idle"] = out["critical"]["ttft_p90_s"] / idle_p90 if idle_p90 else None
    tenants = ("s1", "s2", "s3")
    served = {t: sum(r.status == 200 for r in results if r.tenant == t) for t in tenants}
    fair = max_min_fair({t: sum(r.tenant == t for r in results) for t in tenants}, sum(served.values()))
    out["standard_served_by_tenant"], out["standard_fair_shares"] = served, fair
    # 1 - the largest relative gap between a tenant's served requests and its max-min fair share.
    out["standard_fairness"] = 1 - max(abs(served[t] - fair[t]) / fair[t] for t in tenants if fair[t])
    return out


def max_min_fair(demand: dict[str, int], capacity: int) -> dict[str, float]:
    """Water-filling: each tenant gets its demand or an equal share of what the smaller ones leave."""
    share, left, open_ = {}, float(capacity), sorted(demand, key=demand.get)  # type: ignore[arg-type]
    while open_:
        equal = left / len(open_)
        t = open_[0]
        if demand[t] <= equal:
            share[t], left = float(demand[t]), left - demand[t]
            open_.pop(0)
        else:
            for t in open_:
                share[t] = equal
            break
    return share


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", type=float, default=2.0, help="offered load as a multiple of the measured capacity")
    p.add_argument("--duration-s", type=float, default=40.0)
    p.add_argument("--time-scale", type=float, default=2.0)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--queue-ttl-s", type=float, default=15.0)
    p.add_argument("--release-waiting", type=float, default=0.0,
                   help="the pool's release rule (annotation inference-gateway.io/release-waiting)")
    p.add_argument("--priority-reserve", type=int, default=2,
                   help="room kept for Critical (annotation inference-gateway.io/priority-reserve)")
    p.add_argument("--max-num-seqs", type=int, default=8, help="each pod's batch")
    p.add_argument("--seed", type=int, default=5)
    a = p.parse_args(argv)
    pods = [f"{NET}{i + 1}:8000" for i in range(2)]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "m").mkdir()
        write_manifests(work / "m", pods, a.queue_ttl_s, a.release_waiting, a.priority_reserve)
        fleet = Fleet(FleetSettings(
            manifests_dir=work / "m", work_dir=work / "fleet", redis_port=26392, picker_ports=(9522, 9523),
            picker_metrics_ports=(9532, 9533), picker_admin_ports=(), envoy_admin_port=9592,
            simulator_args=("--time-scale", str(a.time_scale), "--max-num-seqs", str(a.max_num_seqs))))
        fleet.start()

        def fresh(picker_args: tuple[str, ...]) -> None:
            fleet.restart("pods-vllm")
            fleet.wait_pods(60.0)
            for picker in ("picker-0", "picker-1"):
                fleet.restart(picker, picker_args)
            time.sleep(4.0)  # the pickers load the config; Envoy sees both healthy; the collector scrapes

        try:
            fresh(("--no-flow-control",))
            idle = asyncio.run(idle_ttft_p90(40, a.seed + 10))
            fresh(("--no-flow-control",))
            cap = asyncio.run(capacity(20.0, 80, a.max_tokens, a.seed + 20))
            qps = a.load * cap
            for name, picker_args in (("ours (fleet queue)", ()), ("no flow control", ("--no-flow-control",)),
                                      ("per-replica queues", ("--state", "local"))):
                fresh(picker_args)
                sent = asyncio.run(overload(qps, a.duration_s, a.max_tokens, a.seed))
                results[name] = summary(sent, idle, a.duration_s)
                results[name]["raw"] = [asdict(s) for s in sent]
        finally:
            fleet.stop()
    print(f"\nOverload: 2 pods x {a.max_num_seqs} sequences, time scale {a.time_scale:g}, capacity {cap:.1f} req/s "
          f"measured, offered {qps:.1f} req/s ({a.load:g}x) for {a.duration_s:g} s; idle Critical TTFT p90 "
          f"{idle:.3f} s; release to full servers with {a.release_waiting:g} waiting, reserve {a.priority_reserve}")
    print(f"{'router':<20} {'crit p90 s':>10} {'x idle':>7} {'crit lost':>9} {'std served':>10} {'std 503':>8} "
          f"{'std 429':>8} {'shed 429':>9} {'fairness':>9} {'served/s':>9}")
    for name, r in results.items():
        c, s, d = r["critical"], r["standard"], r["sheddable"]
        print(f"{name:<20} {c['ttft_p90_s']:>10.3f} {c['p90_vs_idle']:>7.2f} "
              f"{c['sent'] - c['served']:>4}/{c['sent']:<4} {s['served']:>5}/{s['sent']:<4} "
              f"{s['expired_503']:>8} {s['refused_429']:>8} {d['refused_429'] / max(1, d['sent']):>9.0%} "
              f"{r['standard_fairness'] or 0:>9.2f} {r['served_per_s']:>9.1f}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "overload.json").write_text(json.dumps({"settings": vars(a), "capacity_per_s": cap, "idle_p90_s": idle,
                                                   "results": results}, indent=1))


if __name__ == "__main__":
    main()
