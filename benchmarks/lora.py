"""LoRA-aware routing, side by side: 16 adapters with Zipf popularity on pods with 4 LoRA slots each.

    .venv/bin/python -m benchmarks.lora
    .venv/bin/python -m benchmarks.lora --qps 10 --duration-s 60

Four vLLM-flavoured simulated pods (`--enable-lora --max-loras 4 --max-cpu-loras 8`,
16 adapters), one seeded stream of single-turn requests whose adapter follows a
Zipf law (s = 1.1), Poisson arrivals. The same pods behind Envoy round robin,
behind ours, and behind ours with the LoRA affinity and adapter-home scorers
weighted 0 (the slot filter stays); the pods restart before each run. Per router: adapter activations
(into a GPU slot) and loads (from disk) per 1,000 requests, from the pods
themselves, and TTFT p50/p90. Writes bench/out/lora.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.driver import chat_once
from benchmarks.routing import OUT, percentile
from benchmarks.workloads import Conversation
from local_fleet.fleet import Fleet, FleetSettings

NET = "127.0.70."
ADAPTERS = [f"adapter-{i:02d}" for i in range(16)]
OURS, ROUND_ROBIN = 8290, 8291


def write_manifests(directory: Path, pods: list[str]) -> None:
    docs = ["""apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferencePool
metadata: {name: lora}
spec:
  targetPortNumber: 8000
  selector: {app: lora}""", """apiVersion: v1
kind: Service
metadata: {name: lora-rr}
spec:
  selector: {app: lora}
  ports: [{port: 8000}]""",
            f"apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: lora}}\nspec:\n"
            f"  listeners: [{{name: ours, protocol: HTTP, port: {OURS}}}, "
            f"{{name: rr, protocol: HTTP, port: {ROUND_ROBIN}}}]",
            """apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: ours}
spec:
  parentRefs: [{name: lora, sectionName: ours}]
  rules: [{backendRefs: [{kind: InferencePool, name: lora}]}]""", """apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: rr}
spec:
  parentRefs: [{name: lora, sectionName: rr}]
  rules: [{backendRefs: [{kind: Service, name: lora-rr, port: 8000}]}]"""]
    for i, address in enumerate(pods):
        docs.append(f"apiVersion: v1\nkind: Pod\nmetadata: {{name: lora-{i}, labels: {{app: lora}}}}\n"
                    f"status: {{phase: Running, podIP: {address.split(':')[0]}}}")
    (directory / "lora.yaml").write_text("\n---\n".join(docs) + "\n")


def zipf_choices(count: int, seed: int, s: float = 1.1) -> list[str]:
    rng = random.Random(seed)
    weights = [1 / (rank + 1) ** s for rank in range(len(ADAPTERS))]
    return rng.choices(ADAPTERS, weights=weights, k=count)


async def lora_counts(pods: list[str]) -> tuple[int, int]:
    loads = activations = 0
    async with aiohttp.ClientSession() as http:
        for pod in pods:
            async with http.get(f"http://{pod}/sim/lora") as r:
                counts = await r.json()
            loads, activations = loads + counts["loads"], activations + counts["activations"]
    return loads, activations


async def measure(port: int, pods: list[str], qps: float, duration_s: float, seed: int) -> dict[str, Any]:
    times = random.Random(seed)
    arrivals, at = [], 0.0
    while (at := at + times.expovariate(qps)) < duration_s:
        arrivals.append(at)
    adapters = zipf_choices(len(arrivals), seed + 1)
    words = random.Random(seed + 2)
    before = await lora_counts(pods)
    results = []
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
        start = time.monotonic()

        async def one(at: float, adapter: str, prompt: str) -> None:
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            conv = Conversation(0, 0, "", [], [{"role": "user", "content": prompt}])
            results.append(await chat_once(http, url, adapter, conv, 32))

        prompts = [" ".join(f"w{words.randrange(5000)}" for _ in range(200)) for _ in arrivals]
        await asyncio.gather(*(one(at, a, p) for at, a, p in zip(arrivals, adapters, prompts, strict=True)))
    after = await lora_counts(pods)
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft_s for r in ok]
    per_k = 1000 / max(1, len(results))
    return {"requests": len(results), "failed": len(results) - len(ok),
            "activations_per_1k": (after[1] - before[1]) * per_k, "loads_per_1k": (after[0] - before[0]) * per_k,
            "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p90_s": percentile(ttfts, 0.9)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--qps", type=float, default=8.0)
    p.add_argument("--duration-s", type=float, default=40.0)
    p.add_argument("--time-scale", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=3)
    a = p.parse_args(argv)
    pods = [f"{NET}{i + 1}:8000" for i in range(4)]
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "m").mkdir()
        write_manifests(work / "m", pods)
        fleet = Fleet(FleetSettings(
            manifests_dir=work / "m", work_dir=work / "fleet", redis_port=26391, picker_ports=(9502, 9503),
            picker_metrics_ports=(9512, 9513), picker_admin_ports=(), envoy_admin_port=9591,
            simulator_args=("--time-scale", str(a.time_scale), "--enable-lora", "--max-loras", "4",
                            "--max-cpu-loras", "8", "--lora-modules", *(f"{n}=/adapters/{n}" for n in ADAPTERS))))
        fleet.start()
        try:
            for name, port, picker_args in (("ours", OURS, ()), ("round_robin", ROUND_ROBIN, ()),
                                            ("ours_without_lora_scorers", OURS,
                                             ("--scheduling", "lora_affinity_weight=0", "--scheduling",
                                              "adapter_home_weight=0"))):
                fleet.restart("pods-vllm")
                fleet.wait_pods(60.0)
                for picker in ("picker-0", "picker-1"):
                    fleet.restart(picker, picker_args)
                time.sleep(3.0)  # the pickers load the config; the collector scrapes the fresh pods
                results[name] = asyncio.run(measure(port, pods, a.qps, a.duration_s, a.seed))
        finally:
            fleet.stop()
    print(f"\nLoRA: 4 pods x 4 slots (8 in CPU memory), 16 adapters, Zipf s=1.1, time scale {a.time_scale:g}, "
          f"{a.qps:g} QPS for {a.duration_s:g} s (seed {a.seed})")
    print(f"{'router':<26} {'requests':>8} {'failed':>6} {'activations/1k':>14} {'loads/1k':>9} "
          f"{'TTFT p50 s':>11} {'TTFT p90 s':>11}")
    for name, r in results.items():
        print(f"{name:<26} {r['requests']:>8} {r['failed']:>6} {r['activations_per_1k']:>14.1f} "
              f"{r['loads_per_1k']:>9.1f} {r['ttft_p50_s']:>11.3f} {r['ttft_p90_s']:>11.3f}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "lora.json").write_text(json.dumps({"settings": vars(a), "results": results}, indent=1))


if __name__ == "__main__":
    main()
