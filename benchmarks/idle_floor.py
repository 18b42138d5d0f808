"""The idle figure of `benchmarks.routing` taken apart: what Envoy alone, a trivial ext_proc
server and the pickers each add to an idle request's first token.

On the routing benchmark's fleet (its quick profile's pods, vLLM-like, each a process, at its
time scale, so every process sleeps between requests as in that benchmark), per round:

- straight to one pod (the reference),
- Envoy's round robin listener (`round_robin`),
- our PREFIX_CACHE listener through the pickers (`ours_prefix_cache`), with the pickers' mean
  decision and its Redis calls over those requests (their own histograms),
- the same listener with the trivial ext_proc server (`benchmarks.extproc_floor`) in the pickers'
  place: the floor under any picker written on Python's gRPC, behind this Envoy, on this protocol.

    .venv/bin/python -m benchmarks.idle_floor [--rounds 3] [--requests 100]

Writes bench/out/idle_floor.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.driver import idle_ttft_s
from benchmarks.gateway_figures import ext_proc_streams, picker_timings, trivial_servers
from benchmarks.routers import MODEL, manifests
from benchmarks.routing import PROFILES, restart_pods
from local_fleet.fleet import Fleet, FleetSettings

ROUND_ROBIN, OURS = 8092, 8091  # benchmarks.routers: round_robin, ours_prefix_cache


def idle_ms(url: str, model: str, requests: int) -> float:
    return asyncio.run(idle_ttft_s(url, model, requests=requests)) * 1000


async def trivial_idle_ms(fleet: Fleet, pod: str, requests: int) -> float:
    """Our listener with trivial servers in the pickers' place (every request to `pod`, the model as
    sent: they rewrite nothing); then the pickers come back."""
    try:
        async with trivial_servers(fleet, pod):
            before = ext_proc_streams(fleet)
            added = await idle_ttft_s(f"http://127.0.0.1:{OURS}", MODEL, requests=requests) * 1000
            assert ext_proc_streams(fleet) - before >= requests, "requests bypassed ext_proc"
            return added
    finally:
        for i in range(len(fleet.settings.picker_ports)):
            fleet.restart(f"picker-{i}")
        fleet.wait_pickers_routable()


def measure(fleet: Fleet, pod: str, rounds: int, requests: int) -> list[dict[str, Any]]:
    rows = []
    metrics_ports = list(fleet.settings.picker_metrics_ports)
    for r in range(rounds):
        direct = idle_ms(f"http://{pod}", MODEL, requests)
        row: dict[str, Any] = {"round": r + 1, "direct_ms": direct,
                               "round_robin_added_ms": idle_ms(f"http://127.0.0.1:{ROUND_ROBIN}", MODEL, requests)
                               - direct}
        before = asyncio.run(picker_timings(metrics_ports))
        row["ours_added_ms"] = idle_ms(f"http://127.0.0.1:{OURS}", "bench-prefix", requests) - direct
        after = asyncio.run(picker_timings(metrics_ports))
        row["picker_mean_ms"] = {name: (after[name][1] - before[name][1])
                                 / max(1.0, after[name][0] - before[name][0]) * 1000 for name in after}
        row["trivial_added_ms"] = asyncio.run(trivial_idle_ms(fleet, pod, requests)) - direct
        rows.append(row)
        timings = ", ".join(f"{k} {v:.2f}" for k, v in row["picker_mean_ms"].items())
        print(f"round {r + 1}: direct {direct:.2f} ms; added: round robin {row['round_robin_added_ms']:.2f}, "
              f"trivial ext_proc {row['trivial_added_ms']:.2f}, ours {row['ours_added_ms']:.2f} ms "
              f"(pickers' mean: {timings} ms)", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=100, help="idle requests per route and round (median taken)")
    args = p.parse_args()
    profile = PROFILES["quick"]
    work = Path(tempfile.mkdtemp(prefix="idle-floor-"))
    pods = [f"vllm-{i}@127.0.7.{i + 1}:8000" for i in range(profile.pods)]
    (work / "manifests").mkdir()
    manifests(work / "manifests", "vllm", pods)
    fleet = Fleet(FleetSettings(manifests_dir=work / "manifests", work_dir=work,
                                simulator_args=("--time-scale", str(profile.time_scale),
                                                "--num-blocks", str(profile.num_blocks)),
                                pod_per_process=True))
    try:
        fleet.start()
        fleet.wait_pods()
        restart_pods(fleet, ())
        rows = measure(fleet, pods[0].split("@")[1], args.rounds, args.requests)
    finally:
        fleet.stop()
    out = Path("bench/out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "idle_floor.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
