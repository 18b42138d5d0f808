"""Affinity that survives: the shared-prefix workload through the picker route with

  - shared state (Redis), 1 picker replica and 4 picker replicas;
  - per-replica memory (`--state local`, as upstream pickers keep it), 4 replicas;

and, for the 4-replica runs, the same schedule again with every picker replica
killed and restarted between its two halves. Each run starts a fresh fleet, so
no run inherits another's KV caches. Hit rates come from the pods' own counters.
With `--scaling`, instead: shared state with 1, 2, 4 and 8 picker replicas, each
against one replica's hit rate.

    .venv/bin/python -m benchmarks.affinity [--groups 8 --users 6 --turns 8]
    .venv/bin/python -m benchmarks.affinity --scaling

Writes bench/out/affinity.json and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.driver import hit_rate, prefix_counters, run_turns
from benchmarks.workloads import SharedPrefixWorkload
from local_fleet.fleet import Fleet, FleetSettings

MODEL = "/models/Qwen3-32B"
ROUTE = "http://127.0.0.1:8080"


def fleet_for(pickers: int, state: str, time_scale: float, num_blocks: int) -> Fleet:
    return Fleet(FleetSettings(
        manifests_dir=Path("examples/fleet").resolve(), work_dir=Path(tempfile.mkdtemp(prefix="affinity-")),
        picker_ports=tuple(9002 + i for i in range(pickers)),
        picker_metrics_ports=tuple(9102 + i for i in range(pickers)), picker_admin_ports=(),
        picker_args=("--state", state),
        simulator_args=("--time-scale", str(time_scale), "--num-blocks", str(num_blocks)),
    ))


async def run(fleet: Fleet, workload: SharedPrefixWorkload, restart: bool, concurrency: int) -> dict[str, Any]:
    pods = list(fleet.pods())
    conversations = workload.conversations()
    half = workload.turns // 2
    start = await prefix_counters(pods)
    first = await run_turns(ROUTE, MODEL, conversations, range(0, half), concurrency, workload.max_tokens)
    middle = await prefix_counters(pods)
    restart_s = 0.0
    if restart:
        began = time.monotonic()
        names = [n for n in fleet.processes if n.startswith("picker-")]
        for name in names:
            fleet.kill(name)
        for name in names:
            fleet.restart(name)
        fleet.wait_pickers_routable()
        restart_s = time.monotonic() - began
    window_started = time.monotonic()
    second = await run_turns(ROUTE, MODEL, conversations, range(half, workload.turns), concurrency,
                             workload.max_tokens, deadline_s=10.0)
    window_s = time.monotonic() - window_started
    end = await prefix_counters(pods)
    results = first + second
    return {
        "hit_rate": hit_rate(start, end),
        "first_half_hit_rate": hit_rate(start, middle),
        "second_half_hit_rate": hit_rate(middle, end),
        "second_half_seconds": window_s,
        "restart_seconds": restart_s,
        "requests": len(results),
        "failed": sum(not r.ok for r in results),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--system-words", type=int, default=3000, help="shared prefix per group, in tokens")
    p.add_argument("--time-scale", type=float, default=0.2)
    # Per-pod KV cache: smaller than the workload's working set, larger than its share of it,
    # as on real GPUs, so where a request lands decides whether its prefix is still cached.
    p.add_argument("--num-blocks", type=int, default=4000)
    p.add_argument("--scaling", action="store_true", help="shared state with 1, 2, 4 and 8 replicas instead")
    a = p.parse_args()
    workload = SharedPrefixWorkload(groups=a.groups, users=a.users, turns=a.turns, system_words=a.system_words)
    if a.scaling:
        scaling(workload, a)
        return
    runs = {
        "shared_1_picker": (1, "redis", False),
        "shared_4_pickers": (4, "redis", False),
        "shared_4_pickers_restarted": (4, "redis", True),
        "memory_4_pickers": (4, "local", False),
        "memory_4_pickers_restarted": (4, "local", True),
    }
    out: dict[str, Any] = {"workload": asdict(workload), "num_blocks": a.num_blocks, "runs": {}}
    for name, (pickers, state, restart) in runs.items():
        fleet = fleet_for(pickers, state, a.time_scale, a.num_blocks)
        try:
            fleet.start()
            out["runs"][name] = asyncio.run(run(fleet, workload, restart, a.concurrency))
        finally:
            fleet.stop()
        print(name, json.dumps(out["runs"][name]), flush=True)
    r = out["runs"]
    out["ratios"] = {
        "shared_4_over_1": r["shared_4_pickers"]["hit_rate"] / r["shared_1_picker"]["hit_rate"],
        "memory_4_over_shared_1": r["memory_4_pickers"]["hit_rate"] / r["shared_1_picker"]["hit_rate"],
        "shared_after_restart_over_steady": (r["shared_4_pickers_restarted"]["second_half_hit_rate"]
                                             / r["shared_4_pickers"]["second_half_hit_rate"]),
        "memory_after_restart_over_steady": (r["memory_4_pickers_restarted"]["second_half_hit_rate"]
                                             / r["memory_4_pickers"]["second_half_hit_rate"]),
    }
    Path("bench/out").mkdir(parents=True, exist_ok=True)
    Path("bench/out/affinity.json").write_text(json.dumps(out, indent=2))
    print("\nrun                          hit rate  1st half  2nd half  failed")
    for name, row in r.items():
        print(f"{name:<28} {row['hit_rate']:8.3f} {row['first_half_hit_rate']:9.3f} "
              f"{row['second_half_hit_rate']:9.3f} {row['failed']:7d}")
    print("\nratios:", {k: round(v, 3) for k, v in out["ratios"].items()})


def scaling(workload: SharedPrefixWorkload, a: argparse.Namespace) -> None:
    """Does sharing keep affinity as replicas are added? Hit rate with 1, 2, 4 and 8 replicas."""
    out: dict[str, Any] = {"workload": asdict(workload), "num_blocks": a.num_blocks, "runs": {}}
    for replicas in (1, 2, 4, 8):
        fleet = fleet_for(replicas, "redis", a.time_scale, a.num_blocks)
        try:
            fleet.start()
            out["runs"][replicas] = asyncio.run(run(fleet, workload, False, a.concurrency))
        finally:
            fleet.stop()
        print(replicas, json.dumps(out["runs"][replicas]), flush=True)
    one = out["runs"][1]["hit_rate"]
    Path("bench/out").mkdir(parents=True, exist_ok=True)
    Path("bench/out/affinity-scaling.json").write_text(json.dumps(out, indent=2))
    print("\nreplicas  hit rate  x 1 replica  failed")
    for replicas, row in out["runs"].items():
        print(f"{replicas:>8} {row['hit_rate']:9.3f} {row['hit_rate'] / one:12.3f} {row['failed']:7d}")


if __name__ == "__main__":
    main()
