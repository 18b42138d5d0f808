"""Routing quality, side by side: every router in front of the same simulated pods, same seeded workloads.

    make bench                                        # quick profile
    .venv/bin/python -m benchmarks.routing --profile full

Per flavour (vLLM-like and SGLang-like pods), per workload, per router: the pods
restart first so no router inherits another's cache; then the workload runs and
the hit rate comes from the pods' own counters, TTFT and throughput from the
client, and per-pod KV use and queues from sampling the pods' metrics.
Writes bench/out/summary.json, bench/out/summary.md and PNG plots.
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
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks import arrivals
from benchmarks.driver import Result, idle_ttft_s, prefix_counters
from benchmarks.gateway_figures import ext_proc_streams, start_trivial_servers, stop_trivial_servers
from benchmarks.routers import MODEL, PeerProcess, Router, manifests, routers
from benchmarks.upstream_epp import UpstreamPicker
from benchmarks.workloads import (
    CachedWorkload,
    CachePressureWorkload,
    HotPrefixWorkload,
    SharedPrefixWorkload,
    StressWorkload,
)
from gateway_state.lifecycle import every
from local_fleet.fleet import Fleet, FleetSettings

OUT = Path("bench/out")
QUEUE_FLOOR = 0.1  # waiting requests: below this a pool's mean queue is noise


@dataclass(frozen=True)
class Profile:
    pods: int
    time_scale: float
    num_blocks: int
    shared_prefix: SharedPrefixWorkload
    qps: tuple[float, ...]
    duration_s: float
    stress: StressWorkload
    stress_concurrency: int
    hot: HotPrefixWorkload
    hot_qps: float
    flavours: tuple[str, ...]
    # (d): pods at their real speed, nearly every prompt cached: the router's own cost per request decides.
    cached: CachedWorkload = CachedWorkload()
    cached_qps: float = 20.0
    cached_time_scale: float = 1.0
    cached_warm_up_s: float = 8.0
    # (e): more distinct prefixes than the caches hold, sessions that come back, one pod restarted halfway.
    pressure: CachePressureWorkload = CachePressureWorkload()
    pressure_qps: float = 8.0
    pressure_num_blocks: int = 600
    pressure_duration_s: float = 60.0


# Time scale 10 makes every step ten times slower than the H100 fits, same ratios:
# round robin then saturates near 12 QPS on workload (a), a rate the Python client,
# Envoy and the pickers sustain on 2 cores beside the pods. At time scale 1 it would
# take over 100 QPS, and the machine, not the routers, would be measured.
PROFILES = {
    # About 40 minutes on 2 cores: one flavour, one load level per workload.
    "quick": Profile(pods=8, time_scale=10.0, num_blocks=3000,
                     shared_prefix=SharedPrefixWorkload(groups=32, users=4, turns=8, system_words=3000),
                     qps=(12.0,), duration_s=30.0, stress=StressWorkload(prompts=48, output_tokens=200),
                     stress_concurrency=24, hot=HotPrefixWorkload(requests=120), hot_qps=10.0,
                     flavours=("vllm",)),
    # About two hours: both flavours, a QPS sweep past round robin's saturation, longer runs.
    "full": Profile(pods=8, time_scale=10.0, num_blocks=3000,
                    shared_prefix=SharedPrefixWorkload(groups=32, users=8, turns=8, system_words=3000),
                    qps=(4.0, 8.0, 12.0, 16.0), duration_s=60.0, stress=StressWorkload(prompts=96, output_tokens=400),
                    stress_concurrency=32, hot=HotPrefixWorkload(requests=360), hot_qps=12.0,
                    flavours=("vllm", "sglang")),
}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


Samples = dict[str, list[tuple[float, float, float]]]  # pod -> (seconds, KV use, waiting requests)


async def sample_pods(pods: list[str], stop: asyncio.Event, series: Samples) -> None:
    """Every 0.5 s: each pod's (time, KV use, waiting requests), from its own /metrics."""
    kv_re = re.compile(r"^(?:vllm:kv_cache_usage_perc|sglang:token_usage)\{.*\} (\S+)$", re.M)
    queue_re = re.compile(r"^(?:vllm:num_requests_waiting|sglang:num_queue_reqs)\{.*\} (\S+)$", re.M)
    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        async def sample() -> None:
            for pod in pods:
                try:
                    async with http.get(f"http://{pod}/metrics") as r:
                        text = await r.text()
                except (aiohttp.ClientError, TimeoutError):
                    continue
                kv, queue = kv_re.search(text), queue_re.search(text)
                if kv and queue:
                    series[pod].append((time.monotonic() - started, float(kv.group(1)), float(queue.group(1))))

        await every(0.5, stop, sample)


async def measure(url: str, model: str, pods: list[str], workload: str, profile: Profile, qps: float,
                  seed: int, restart_one: Callable[[], None] | None = None) -> dict[str, Any]:
    """`restart_one`: restarts one pod (workload (e) calls it halfway through, off the event loop)."""
    if workload == "cached":  # the caches fill through the router under test, then the counting starts
        warm = replace(profile.cached, seed=profile.cached.seed + 1)
        await arrivals.poisson(url, model, warm.conversations(), qps, profile.cached_warm_up_s, warm.max_tokens, seed)
    series: Samples = defaultdict(list)
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_pods(pods, stop, series))
    before = await prefix_counters(pods)
    started = time.monotonic()
    if workload == "shared_prefix":
        done = await arrivals.poisson(url, model, profile.shared_prefix.conversations(), qps, profile.duration_s,
                                      profile.shared_prefix.max_tokens, seed)
    elif workload == "hot_prefix":
        done = await arrivals.poisson(url, model, profile.hot.conversations(), qps, profile.duration_s,
                                      profile.hot.max_tokens, seed)
    elif workload == "cached":
        done = await arrivals.poisson(url, model, profile.cached.conversations(), qps, profile.duration_s,
                                      profile.cached.max_tokens, seed)
    elif workload == "pressure":
        async def restart_halfway() -> None:
            await asyncio.sleep(profile.pressure_duration_s / 2)
            if restart_one is not None:
                await asyncio.to_thread(restart_one)

        restarter = asyncio.create_task(restart_halfway())
        done = await arrivals.poisson(url, model, profile.pressure.conversations(), qps, profile.pressure_duration_s,
                                      profile.pressure.max_tokens, seed)
        await restarter
    else:
        rng = random.Random(seed)
        done = await arrivals.concurrent(url, model, profile.stress.conversations(), profile.stress_concurrency,
                                         lambda: profile.stress.max_tokens(rng))
    sent = done.sent
    wall = time.monotonic() - started
    stop.set()
    await sampler
    after = await prefix_counters(pods)
    ok = [s.result for s in sent if s.result.ok]
    ttfts = [r.ttft_s for r in ok]
    kv_means = {p: statistics.mean(kv for _, kv, _ in rows) for p, rows in series.items() if rows}
    queue_means = {p: statistics.mean(q for _, _, q in rows) for p, rows in series.items() if rows}
    pool_queue = statistics.mean(queue_means.values()) if queue_means else 0.0
    return {
        "hit_rate": (after[0] - before[0]) / (after[1] - before[1]) if after[1] > before[1] else 0.0,
        "oracle_hit_rate": arrivals.oracle_hit_rate([s.prompt for s in sent]),
        "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p90_s": percentile(ttfts, 0.9),
        "ttft_p99_s": percentile(ttfts, 0.99),
        "e2e_p50_s": percentile([r.latency_s for r in ok], 0.5),
        "e2e_p99_s": percentile([r.latency_s for r in ok], 0.99),
        "output_tok_s": sum(r.output_tokens for r in ok) / wall,
        "requests": len(sent), "failed": len(sent) - len(ok), "dropped_arrivals": done.dropped,
        "errors": dict(Counter(s.result.error for s in sent if not s.result.ok).most_common(3)),
        "per_pod_requests": dict(Counter(r.pod for r in ok)),
        # The stress workload's first burst (its first `stress_concurrency` requests by start), per pod, fewest
        # first: an even spread is what keeps that burst's prefills from piling up on one pod.
        "first_wave_per_pod": first_wave(ok, len(pods), profile.stress_concurrency) if workload == "stress" else [],
        "kv_mean_per_pod": kv_means,
        "kv_spread": statistics.pstdev(kv_means.values()) if len(kv_means) > 1 else 0.0,
        "queue_mean_per_pod": queue_means,
        # Against at least a tenth of a waiting request: on an idle pool one blip is not an imbalance.
        "max_queue_over_pool_mean": max(queue_means.values(), default=0.0) / max(pool_queue, QUEUE_FLOOR),
        "ttfts": ttfts,
        "kv_series": {p: [(t, kv) for t, kv, _ in rows] for p, rows in series.items()},
    }


def first_wave(results: list[Result], pods: int, size: int) -> list[int]:
    """How many of the first `size` requests to start each of the `pods` pods served, fewest first."""
    wave = sorted(results, key=lambda r: r.finished_at - r.latency_s)[:size]
    counts = Counter(r.pod for r in wave)
    return sorted([*counts.values(), *[0] * max(0, pods - len(counts))])


WORKLOADS = ("shared_prefix", "stress", "hot_prefix", "cached", "pressure")


def restart_pods(fleet: Fleet, extra: tuple[str, ...]) -> None:
    """Every pod anew (empty caches, zeroed counters), with `extra` simulator flags for this workload."""
    for name in sorted(n for n in fleet.processes if n.startswith("pod-")):
        fleet.restart(name, extra)
    fleet.wait_pods()


def run_flavour(flavour: str, profile: Profile, selected: list[Router], workloads: tuple[str, ...],
                picker_args: tuple[str, ...], progress: list[int], total: int, rows: list[dict[str, Any]],
                runs: int = 1) -> None:
    """Each workload `runs` times in a row, every router once per run; run r seeds the arrivals with 17 + r,
    so the routers of one run see the same arrivals and the runs are different draws."""
    work = Path(tempfile.mkdtemp(prefix=f"bench-{flavour}-"))
    subnet = 7 if flavour == "vllm" else 8
    pods = [f"{flavour}-{i}@127.0.{subnet}.{i + 1}:8000" for i in range(profile.pods)]
    (work / "manifests").mkdir()
    manifests(work / "manifests", flavour, pods)
    # A process per pod, so one can restart alone (workload (e)).
    fleet = Fleet(FleetSettings(manifests_dir=work / "manifests", work_dir=work,
                                simulator_args=("--time-scale", str(profile.time_scale),
                                                "--num-blocks", str(profile.num_blocks)),
                                picker_args=picker_args, pod_per_process=True))
    endpoints = [p.split("@")[1] for p in pods]
    upstream = UpstreamPicker(work, flavour, endpoints, next(r.port for r in routers() if r.kind == "upstream"))
    fleet.start()
    try:
        fleet.wait_pods()
        plan = [("shared_prefix", q) for q in profile.qps] + [("stress", 0.0), ("hot_prefix", profile.hot_qps),
                                                              ("cached", profile.cached_qps),
                                                              ("pressure", profile.pressure_qps)]
        plan = [(w, q) for w, q in plan if w in workloads]
        direct_s: dict[tuple[str, ...], float] = {}  # per pod speed: a request straight to an idle pod
        for workload, qps in plan:
            # Each workload's pods at its own speed and cache size; cold caches and zeroed counters for every router.
            speed = ("--time-scale", str(profile.cached_time_scale)) if workload == "cached" else \
                ("--num-blocks", str(profile.pressure_num_blocks)) if workload == "pressure" else ()
            if speed not in direct_s:
                restart_pods(fleet, speed)
                direct_s[speed] = asyncio.run(idle_ttft_s(f"http://{endpoints[0]}", MODEL))
            for run, router in ((run, router) for run in range(runs) for router in selected):
                progress[0] += 1
                print(f"[{progress[0]}/{total}] {flavour} {workload} qps={qps or '-'} {router.name}"
                      + (f" run {run + 1}" if runs > 1 else "") + " ...", flush=True)
                restart_pods(fleet, speed)
                peer = None
                if router.kind == "peer":
                    peer = PeerProcess(router, endpoints, work)
                    peer.start()
                elif router.kind == "picker-local":
                    for name in ("picker-0", "picker-1"):
                        fleet.restart(name, ("--state", "local"))
                    fleet.wait_pickers_routable()
                elif router.kind == "upstream":
                    upstream.start(router.replicas)
                elif router.kind == "floor":
                    floor = start_trivial_servers(fleet, ",".join(endpoints))
                    fleet.wait_envoy_routes_to_pickers()
                    streams = ext_proc_streams(fleet)
                try:
                    added_ms = (asyncio.run(idle_ttft_s(f"http://127.0.0.1:{router.port}", router.model))
                                - direct_s[speed]) * 1000
                    one = f"pod-{pods[len(pods) // 2].split('@')[0]}"
                    result = asyncio.run(measure(f"http://127.0.0.1:{router.port}", router.model, endpoints,
                                                 workload, profile, qps, seed=17 + run,
                                                 restart_one=lambda one=one, speed=speed: fleet.restart(one, speed)))
                finally:
                    if peer is not None:
                        peer.stop()
                    if router.kind == "upstream":  # its API server too: no other router runs beside it
                        upstream.stop()
                    if router.kind == "floor":
                        # Every request of the run opened an ext_proc stream: none went round the servers.
                        floor_streams = ext_proc_streams(fleet) - streams
                        stop_trivial_servers(floor)
                    if router.kind in ("picker-local", "floor"):
                        for name in ("picker-0", "picker-1"):
                            fleet.restart(name)
                        fleet.wait_pickers_routable()
                if router.kind == "floor" and floor_streams < result["requests"]:
                    raise RuntimeError(f"{router.name}: {floor_streams} ext_proc streams for {result['requests']} "
                                       "requests: requests went round the trivial servers")
                row = {"flavour": flavour, "workload": workload, "qps": qps, "router": router.name, "run": run,
                       "idle_added_ms": added_ms, **result}
                rows.append(row)
                print(f"    hit {row['hit_rate']:.3f} (oracle {row['oracle_hit_rate']:.3f}) idle +{added_ms:.1f} ms "
                      f"ttft p90 {row['ttft_p90_s']:.3f} s  {row['output_tok_s']:.0f} tok/s  "
                      f"failed {row['failed']} {row['errors'] or ''}"
                      f"{'  first wave ' + str(row['first_wave_per_pod']) if row['first_wave_per_pod'] else ''}",
                      flush=True)
    finally:
        upstream.stop()
        fleet.stop()


def write_outputs(rows: list[dict[str, Any]]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    summary = [{k: v for k, v in r.items() if k not in ("ttfts", "kv_series")} for r in rows]
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = ["| flavour | workload | qps | router | run | hit rate | oracle | TTFT p50 s | p90 s | p99 s | out tok/s | "
             "KV spread | max queue / mean | failed | idle added ms |", "|" + "---|" * 15]
    for r in summary:
        lines.append(f"| {r['flavour']} | {r['workload']} | {r['qps'] or '-'} | {r['router']} | {r['run'] + 1} | "
                     f"{r['hit_rate']:.3f} | {r['oracle_hit_rate']:.3f} | {r['ttft_p50_s']:.3f} | "
                     f"{r['ttft_p90_s']:.3f} | {r['ttft_p99_s']:.3f} | {r['output_tok_s']:.0f} | "
                     f"{r['kv_spread']:.3f} | "
                     f"{r['max_queue_over_pool_mean']:.2f} | {r['failed']} | {r['idle_added_ms']:.1f} |")
    lines += ["", *targets([r for r in summary if r["run"] == 0]), "", *repeated(summary)]
    (OUT / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows)


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, checked on this run's rows: one line per target and flavour."""
    out = ["| flavour | target | figure | met |", "|---|---|---|---|"]

    def check(flavour: str, name: str, figure: str, met: bool) -> None:
        out.append(f"| {flavour} | {name} | {figure} | {'yes' if met else 'no'} |")

    for flavour in sorted({r["flavour"] for r in rows}):
        by: dict[tuple[str, float], dict[str, dict[str, Any]]] = defaultdict(dict)
        for r in rows:
            if r["flavour"] == flavour:
                by[(r["workload"], r["qps"])][r["router"]] = r
        # (a) at the highest rate round robin still completes: no failures, no arrival it could not absorb.
        rates = sorted(q for (w, q), group in by.items() if w == "shared_prefix" and "round_robin" in group)
        done = [q for q in rates if not by[("shared_prefix", q)]["round_robin"]["failed"]
                and not by[("shared_prefix", q)]["round_robin"]["dropped_arrivals"]]
        if rates:
            q = done[-1] if done else rates[0]
            g = by[("shared_prefix", q)]
            ours, rr, sgl = g.get("ours_prefix_cache"), g["round_robin"], g.get("sglang_cache_aware")
            if ours:
                check(flavour, f"(a) {q:g} QPS: hit >= 0.9 x oracle",
                      f"{ours['hit_rate']:.3f} / {ours['oracle_hit_rate']:.3f}",
                      ours["hit_rate"] >= 0.9 * ours["oracle_hit_rate"])
                check(flavour, f"(a) {q:g} QPS: TTFT p90 <= 0.5 x round robin",
                      f"{ours['ttft_p90_s']:.3f} / {rr['ttft_p90_s']:.3f} s",
                      ours["ttft_p90_s"] <= 0.5 * rr["ttft_p90_s"])
                if sgl:
                    check(flavour, f"(a) {q:g} QPS: hit >= sglang cache_aware",
                          f"{ours['hit_rate']:.3f} / {sgl['hit_rate']:.3f}", ours["hit_rate"] >= sgl["hit_rate"])
                    check(flavour, f"(a) {q:g} QPS: TTFT p90 <= sglang cache_aware",
                          f"{ours['ttft_p90_s']:.3f} / {sgl['ttft_p90_s']:.3f} s",
                          ours["ttft_p90_s"] <= sgl["ttft_p90_s"])
        g = by.get(("stress", 0.0), {})
        peers = [r for name, r in g.items() if not name.startswith("ours")]
        for name in ("ours_default", "ours_prefix_cache"):
            if name in g and peers:
                ours = g[name]
                best_ttft = min(peers, key=lambda r: r["ttft_p90_s"])
                best_tok = max(peers, key=lambda r: r["output_tok_s"])
                check(flavour, f"(b) {name}: TTFT p90 within 5% of the best peer ({best_ttft['router']})",
                      f"{ours['ttft_p90_s']:.3f} / {best_ttft['ttft_p90_s']:.3f} s",
                      ours["ttft_p90_s"] <= 1.05 * best_ttft["ttft_p90_s"])
                check(flavour, f"(b) {name}: output within 5% of the best peer ({best_tok['router']})",
                      f"{ours['output_tok_s']:.0f} / {best_tok['output_tok_s']:.0f} tok/s",
                      ours["output_tok_s"] >= 0.95 * best_tok["output_tok_s"])
                if "round_robin" in g:
                    check(flavour, f"(b) {name}: KV spread below round robin's",
                          f"{ours['kv_spread']:.4f} / {g['round_robin']['kv_spread']:.4f}",
                          ours["kv_spread"] < g["round_robin"]["kv_spread"])
        for (w, q), g in by.items():
            if w == "hot_prefix" and "ours_prefix_cache" in g:
                ours = g["ours_prefix_cache"]
                check(flavour, f"(c) {q:g} QPS: no pod's mean queue above 2 x the pool's",
                      f"{ours['max_queue_over_pool_mean']:.2f}", ours["max_queue_over_pool_mean"] <= 2.0)
                check(flavour, f"(c) {q:g} QPS: hit >= 0.8 x oracle",
                      f"{ours['hit_rate']:.3f} / {ours['oracle_hit_rate']:.3f}",
                      ours["hit_rate"] >= 0.8 * ours["oracle_hit_rate"])
        for (w, q), g in by.items():
            mine, plain, sglang = g.get("ours_prefix_cache"), g.get("round_robin"), g.get("sglang_cache_aware")
            if w == "cached" and mine and plain:
                check(flavour, f"(d) {q:g} QPS: TTFT p50 <= round robin's + 1 ms",
                      f"{mine['ttft_p50_s'] * 1000:.1f} / {plain['ttft_p50_s'] * 1000:.1f} ms",
                      mine["ttft_p50_s"] <= plain["ttft_p50_s"] + 0.001)
            if w == "cached" and mine and sglang:
                check(flavour, f"(d) {q:g} QPS: TTFT p90 <= sglang cache_aware's",
                      f"{mine['ttft_p90_s'] * 1000:.1f} / {sglang['ttft_p90_s'] * 1000:.1f} ms",
                      mine["ttft_p90_s"] <= sglang["ttft_p90_s"])
        # The upstream endpoint picker, one replica and two: ours beats it on hit rate and the TTFT tail.
        for (w, q), g in sorted(by.items()):
            ours = g.get("ours_prefix_cache")
            for name in ("upstream_epp", "upstream_epp_2_replicas"):
                peer = g.get(name)
                if ours is None or peer is None:
                    continue
                where = f"{w} {q:g} QPS" if q else w
                check(flavour, f"{where}: hit > {name}", f"{ours['hit_rate']:.3f} / {peer['hit_rate']:.3f}",
                      ours["hit_rate"] > peer["hit_rate"])
                for pct in ("p90", "p99"):
                    check(flavour, f"{where}: TTFT {pct} < {name}",
                          f"{ours[f'ttft_{pct}_s']:.3f} / {peer[f'ttft_{pct}_s']:.3f} s",
                          ours[f"ttft_{pct}_s"] < peer[f"ttft_{pct}_s"])
    return out if len(out) > 2 else []


def repeated(rows: list[dict[str, Any]]) -> list[str]:
    """Over repeated runs (`--runs`): each router's mean and worst figures, and the tail target on workload (a):
    our mean p99 at most sglang cache_aware's, our worst at most its worst, hit rate and p90 no worse."""
    groups: dict[tuple[str, str, float], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[(r["flavour"], r["workload"], r["qps"])][r["router"]].append(r)
    if all(len(runs) < 2 for g in groups.values() for runs in g.values()) and \
            not any("ours_events" in g for g in groups.values()):
        return []
    out = ["| flavour | workload | qps | router | runs | mean hit | mean p90 s | mean p99 s | worst p99 s |",
           "|" + "---|" * 9]
    checks = ["| flavour | target over the runs | figure | met |", "|---|---|---|---|"]
    for (flavour, workload, qps), by_router in groups.items():
        means: dict[str, dict[str, float]] = {}
        for router, runs in by_router.items():
            means[router] = {"hit": statistics.mean(r["hit_rate"] for r in runs),
                             "p90": statistics.mean(r["ttft_p90_s"] for r in runs),
                             "p99": statistics.mean(r["ttft_p99_s"] for r in runs),
                             "worst": max(r["ttft_p99_s"] for r in runs), "n": len(runs)}
            m = means[router]
            out.append(f"| {flavour} | {workload} | {qps or '-'} | {router} | {m['n']:.0f} | {m['hit']:.3f} | "
                       f"{m['p90']:.3f} | {m['p99']:.3f} | {m['worst']:.3f} |")
        events, approximate = means.get("ours_events"), means.get("ours_prefix_cache")
        if workload == "pressure" and events:
            where = f"| {flavour} | (e) {qps:g} QPS: ours_events"
            if approximate:
                met = events["hit"] >= approximate["hit"] + 0.05
                checks.append(f"{where} mean hit >= ours_prefix_cache's + 0.05 | {events['hit']:.3f} / "
                              f"{approximate['hit']:.3f} | {'yes' if met else 'no'} |")
            for peer in ("ours_prefix_cache", "sglang_cache_aware", "upstream_epp"):
                if peer in means:
                    for key in ("p90", "p99"):
                        met = events[key] < means[peer][key]
                        checks.append(f"{where} mean {key} < {peer}'s | {events[key]:.3f} / {means[peer][key]:.3f} | "
                                      f"{'yes' if met else 'no'} |")
                    if peer != "ours_prefix_cache":
                        met = events["hit"] > means[peer]["hit"]
                        checks.append(f"{where} mean hit > {peer}'s | {events['hit']:.3f} / {means[peer]['hit']:.3f} "
                                      f"| {'yes' if met else 'no'} |")
        if workload == "shared_prefix" and events and approximate:
            for key, met in (("hit", events["hit"] >= approximate["hit"]),
                             ("p90", events["p90"] <= approximate["p90"])):
                checks.append(f"| {flavour} | (a) {qps:g} QPS: ours_events mean {key} no worse than "
                              f"ours_prefix_cache's | {events[key]:.3f} / {approximate[key]:.3f} | "
                              f"{'yes' if met else 'no'} |")
        ours, sgl = means.get("ours_prefix_cache"), means.get("sglang_cache_aware")
        if workload == "shared_prefix" and ours and sgl:
            for name, key, better in (("mean p99 <=", "p99", min), ("worst p99 <=", "worst", min),
                                      ("mean hit >=", "hit", max), ("mean p90 <=", "p90", min)):
                met = better(ours[key], sgl[key]) == ours[key]
                checks.append(f"| {flavour} | (a) {qps:g} QPS: ours {name} sglang cache_aware's | "
                              f"{ours[key]:.3f} / {sgl[key]:.3f} | {'yes' if met else 'no'} |")
    return out + ([""] + checks if len(checks) > 2 else [])


def plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for (flavour, workload, qps), group in _groups(rows).items():
        tag = f"{flavour}_{workload}" + (f"_qps{qps:g}" if qps else "")
        fig, ax = plt.subplots(figsize=(8, 5))
        for r in group:
            values = sorted(r["ttfts"])
            if values:
                ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=r["router"])
        ax.set(xlabel="TTFT (s)", ylabel="fraction of requests", title=f"TTFT CDF: {tag}", xscale="log")
        ax.legend(fontsize=7)
        fig.savefig(OUT / f"ttft_cdf_{tag}.png", dpi=100)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(8, 5))
        ax.bar([r["router"] for r in group], [r["hit_rate"] for r in group])
        ax.axhline(group[0]["oracle_hit_rate"], color="k", linestyle="--", label="oracle")
        ax.set(ylabel="prefix-cache hit rate", title=f"Hit rate: {tag}")
        ax.tick_params(axis="x", rotation=60, labelsize=7)
        ax.legend()
        fig.tight_layout()
        fig.savefig(OUT / f"hit_rate_{tag}.png", dpi=100)
        plt.close(fig)
        shown = [r for r in group if r["router"] in ("round_robin", "ours_prefix_cache", "sglang_cache_aware")]
        fig, axes = plt.subplots(len(shown), 1, figsize=(8, 3 * max(1, len(shown))), squeeze=False)
        for ax, r in zip(axes[:, 0], shown, strict=True):
            for pod, points in sorted(r["kv_series"].items()):
                ax.plot([t for t, _ in points], [kv for _, kv in points], label=pod)
            ax.set(title=f"KV-cache use per pod: {r['router']}", xlabel="s", ylabel="KV use")
        fig.tight_layout()
        fig.savefig(OUT / f"kv_per_pod_{tag}.png", dpi=100)
        plt.close(fig)


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, str, float], list[dict[str, Any]]]:
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["flavour"], r["workload"], r["qps"])].append(r)
    return groups


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    p.add_argument("--routers", nargs="*", help="names to run (default: all)")
    p.add_argument("--workloads", nargs="*", choices=WORKLOADS, default=list(WORKLOADS))
    p.add_argument("--qps", nargs="*", type=float, help="shared-prefix arrival rates (default: the profile's)")
    p.add_argument("--flavours", nargs="*", choices=("vllm", "sglang"), help="pod flavours (default: the profile's)")
    p.add_argument("--time-scale", type=float, help="simulated model speed (above 1: slower, same ratios)")
    p.add_argument("--runs", type=int, default=1, help="each workload this many times, a new arrival seed each")
    p.add_argument("--scheduling", nargs="*", default=[], metavar="NAME=VALUE",
                   help="our pickers' scheduling overrides, for tuning (see picker --scheduling)")
    a = p.parse_args()
    profile = PROFILES[a.profile]
    if a.qps:
        profile = replace(profile, qps=tuple(a.qps))
    if a.time_scale:
        profile = replace(profile, time_scale=a.time_scale)
    if a.flavours:
        profile = replace(profile, flavours=tuple(a.flavours))
    selected = [r for r in routers() if not a.routers or r.name in a.routers]
    runs_per_flavour = (len(profile.qps) * ("shared_prefix" in a.workloads) + ("stress" in a.workloads)
                        + ("hot_prefix" in a.workloads) + ("cached" in a.workloads) + ("pressure" in a.workloads))
    total = len(profile.flavours) * runs_per_flavour * len(selected) * a.runs
    rows: list[dict[str, Any]] = []
    progress = [0]
    for flavour in profile.flavours:
        run_flavour(flavour, profile, selected, tuple(a.workloads),
                    tuple(arg for pair in a.scheduling for arg in ("--scheduling", pair)), progress, total, rows,
                    a.runs)
    (OUT / "profile.json").parent.mkdir(parents=True, exist_ok=True)
    (OUT / "profile.json").write_text(json.dumps({"profile": a.profile, **asdict(profile)}, indent=2, default=str))
    write_outputs(rows)


if __name__ == "__main__":
    main()
