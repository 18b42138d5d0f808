"""Routing on real engines: shared-prefix conversations across two llama.cpp pods serving a real model
(examples/llama-cpp), through round robin, ours with DEFAULT and ours with PREFIX_CACHE, in one run on
the same pods, each router after a restart of the pods (empty caches). What the engines computed and
reused comes from their own counters (`llamacpp:prompt_tokens_total`, `prompt_tokens_cached_total`).

Then the same workload on simulated pods (the same manifests, the pools declaring vLLM), for what the
simulator predicts; the closing lines set the two sets of gains side by side.

    .venv/bin/python -m benchmarks.real_engine [--groups 4 --users 3 --turns 3 --rate 0.5] [--no-simulated]

Uses the local fleet's default ports (do not run it beside `make up`). Writes bench/out/real_engine.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import tempfile
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from benchmarks.driver import Result, chat_once
from benchmarks.workloads import Conversation, SharedPrefixWorkload
from local_fleet.fleet import Fleet, FleetSettings

EXAMPLE = Path(__file__).parent.parent / "examples" / "llama-cpp"
MODEL = "smollm2"
# Round robin on the example's plain route; a DEFAULT pool over the same pods on a third listener.
ROUTERS = {"round_robin": 8081, "ours_default": 8082, "ours_prefix_cache": 8080}
_COUNTER = re.compile(r"^(llamacpp:prompt_tokens_total|llamacpp:prompt_tokens_cached_total|"
                      r"vllm:prompt_tokens_total|vllm:prefix_cache_hits_total)(?:\{[^}]*\})? (\S+)$", re.M)


def manifests(engine: str) -> Path:
    """The example's manifests, plus a DEFAULT pool over the same pods routed from :8082; for `vllm`, the pools
    declare simulated vLLM pods instead."""
    out = Path(tempfile.mkdtemp(prefix="real-engine-manifests-"))
    for path in EXAMPLE.glob("*.yaml"):
        text = path.read_text()
        if engine != "llama.cpp":
            text = text.replace('model-server-runtime: "llama.cpp"', f'model-server-runtime: "{engine}"')
        (out / path.name).write_text(text)
    docs = [d for d in yaml.safe_load_all((out / "inference.yaml").read_text()) if d]
    pool = next(d for d in docs if d["kind"] == "InferencePool")
    default = json.loads(json.dumps(pool))
    default["metadata"]["name"] = "smollm2-default-pool"
    default["metadata"]["annotations"]["inference.networking.x-k8s.io/routing-strategy"] = "DEFAULT"
    model = next(d for d in docs if d["kind"] == "InferenceModel")
    default_model = json.loads(json.dumps(model))
    default_model["metadata"]["name"] = "smollm2-default"
    default_model["spec"]["poolRef"]["name"] = "smollm2-default-pool"
    gateway = [d for d in yaml.safe_load_all((out / "gateway.yaml").read_text()) if d]
    listeners = next(d for d in gateway if d["kind"] == "Gateway")["spec"]["listeners"]
    listeners.append({"name": "http-default", "protocol": "HTTP", "port": ROUTERS["ours_default"]})
    route = json.loads(json.dumps(next(d for d in gateway if d["kind"] == "HTTPRoute"
                                       and d["spec"]["rules"][0]["backendRefs"][0]["kind"] == "InferencePool")))
    route["metadata"]["name"] = "default-route"
    route["spec"]["parentRefs"][0]["sectionName"] = "http-default"
    route["spec"]["rules"][0]["backendRefs"][0]["name"] = "smollm2-default-pool"
    (out / "default.yaml").write_text(yaml.safe_dump_all([default, default_model, route]))
    (out / "gateway.yaml").write_text(yaml.safe_dump_all(gateway))
    return out


def counters(pods: list[str]) -> tuple[float, float]:
    """(prompt tokens computed, prompt tokens reused) summed over the pods, by their own counters."""
    computed = reused = 0.0
    for pod in pods:
        with urllib.request.urlopen(f"http://{pod}/metrics", timeout=60) as r:
            found = {m[1]: float(m[2]) for m in _COUNTER.finditer(r.read().decode())}
        if "llamacpp:prompt_tokens_total" in found:  # llama.cpp counts computed tokens only
            computed += found["llamacpp:prompt_tokens_total"]
            reused += found.get("llamacpp:prompt_tokens_cached_total", 0.0)
        else:  # vLLM counts every prompt token, the cached ones among them
            reused += found.get("vllm:prefix_cache_hits_total", 0.0)
            computed += found.get("vllm:prompt_tokens_total", 0.0) - found.get("vllm:prefix_cache_hits_total", 0.0)
    return computed, reused


async def drive(port: int, conversations: list[Conversation], turns: int, rate: float, max_tokens: int,
                seed: int) -> list[Result]:
    """Conversations start at Poisson arrivals (`rate` a second); each takes its turns one after another."""
    rng = random.Random(seed)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    results: list[Result] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        async def converse(conv: Conversation, delay: float) -> None:
            await asyncio.sleep(delay)
            for t in range(turns):
                conv.messages.append({"role": "user", "content": conv.questions[t]})
                results.append(await chat_once(http, url, MODEL, conv, max_tokens))

        starts, at = [], 0.0
        for _ in conversations:
            at += rng.expovariate(rate)
            starts.append(at)
        await asyncio.gather(*(converse(c, s) for c, s in zip(conversations, starts, strict=True)))
    return results


def restart_pods(fleet: Fleet) -> None:
    """Every pod anew, caches empty; then a few collector rounds so the pickers see them up."""
    for name in [n for n in fleet.processes if n.startswith("pod")]:
        fleet.restart(name)
    fleet.wait_pods(120)
    time.sleep(2.0)


def run_engine(engine: str, workload: SharedPrefixWorkload, rate: float, work_dir: Path) -> dict[str, Any]:
    fleet = Fleet(FleetSettings(manifests_dir=manifests(engine), work_dir=work_dir, picker_admin_ports=(),
                                simulator_args=("--time-scale", "1", "--model", MODEL)))
    rows: dict[str, Any] = {}
    try:
        fleet.start(timeout_s=180)
        pods = list(fleet.pods())
        for router, port in ROUTERS.items():
            restart_pods(fleet)
            conversations = workload.conversations()
            before = counters(pods)
            started = time.monotonic()
            results = asyncio.run(drive(port, conversations, workload.turns, rate, workload.max_tokens, workload.seed))
            wall = time.monotonic() - started
            after = counters(pods)
            ok = [r for r in results if r.ok]
            ttfts = sorted(r.ttft_s for r in ok)
            computed, reused = after[0] - before[0], after[1] - before[1]
            rows[router] = {
                "requests": len(results), "errors": len(results) - len(ok), "wall_s": round(wall, 1),
                "computed_tokens": int(computed), "reused_tokens": int(reused),
                "reused_share": round(reused / (computed + reused), 3) if computed + reused else 0.0,
                "ttft_p50_s": round(statistics.median(ttfts), 3) if ttfts else None,
                "ttft_p90_s": round(ttfts[int(0.9 * (len(ttfts) - 1))], 3) if ttfts else None,
                "latency_p50_s": round(statistics.median(r.latency_s for r in ok), 3) if ok else None,
                "pods": {p: sum(1 for r in ok if r.pod == p) for p in sorted({r.pod or "" for r in ok})},
            }
            print(f"  {engine:9} {router:18} {json.dumps(rows[router])}", flush=True)
    finally:
        fleet.stop()
    return rows


def _gain(rows: dict[str, Any], router: str, field: str) -> str:
    base, value = rows["round_robin"][field], rows[router][field]
    return f"{value / base:.2f}" if base and value is not None else "-"


def main() -> None:
    p = argparse.ArgumentParser(prog="benchmarks.real_engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--users", type=int, default=2)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--system-words", type=int, default=220, help="each group's shared system prompt")
    p.add_argument("--question-words", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--rate", type=float, default=0.15, help="conversations starting per second")
    p.add_argument("--no-simulated", action="store_true", help="skip the simulator's prediction")
    a = p.parse_args()
    workload = SharedPrefixWorkload(groups=a.groups, users=a.users, turns=a.turns, system_words=a.system_words,
                                    question_words=a.question_words, max_tokens=a.max_tokens)
    out: dict[str, Any] = {"workload": asdict(workload), "rate": a.rate}
    for engine in ("llama.cpp",) + (() if a.no_simulated else ("vllm",)):
        print(f"{engine} pods:", flush=True)
        out[engine] = run_engine(engine, workload, a.rate, Path(tempfile.mkdtemp(prefix=f"real-engine-{engine}-")))
    print("\nagainst round robin (below 1: fewer tokens computed, shorter TTFT)")
    print(f"{'pods':10} {'router':18} {'computed':>9} {'TTFT p50':>9} {'TTFT p90':>9}")
    for engine in ("llama.cpp", "vllm"):
        if engine in out:
            for router in ("ours_default", "ours_prefix_cache"):
                rows = out[engine]
                print(f"{engine:10} {router:18} {_gain(rows, router, 'computed_tokens'):>9} "
                      f"{_gain(rows, router, 'ttft_p50_s'):>9} {_gain(rows, router, 'ttft_p90_s'):>9}")
    path = Path("bench/out/real_engine.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
