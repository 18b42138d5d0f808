"""SGLang prefill/decode disaggregation, side by side: the same PD pods behind sglang-router's PD mode and ours.

    .venv/bin/python -m benchmarks.pd                     # needs the bench extras (make bench installs them)
    .venv/bin/python -m benchmarks.pd --qps 8 --duration-s 60

Two prefill and two decode pods (the SGLang-flavoured simulator in PD mode, their
KV caches small enough that placement matters), one seeded shared-prefix
workload with Poisson arrivals. The pods restart between routers so neither
inherits the other's caches. Per router: TTFT p50/p90, output tokens per second,
the prefill pods' prefix hit rate (their own cached/prompt token counters) and
failures. Writes bench/out/pd.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import arrivals
from benchmarks.driver import hit_rate, prefix_counters
from benchmarks.routers import MODEL, tokenizer_file, wait_routable
from benchmarks.routing import OUT, percentile
from benchmarks.workloads import SharedPrefixWorkload
from local_fleet.fleet import Fleet, FleetSettings

NET = "127.0.60."
BOOTSTRAP_PORT = 34000
OURS_PORT, PEER_PORT = 8190, 30200
ROLE = "rolebasedgroup.workloads.x-k8s.io/role"


def pods(side: str, count: int, first: int) -> list[str]:
    return [f"{NET}{first + i}:8000" for i in range(count)]


def write_manifests(directory: Path, prefill: list[str], decode: list[str]) -> None:
    docs = ["""apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferencePool
metadata:
  name: pd-bench
  annotations: {inference.networking.x-k8s.io/model-server-runtime: sglang}
spec:
  targetPortNumber: 8000
  selector: {app: pd-bench}""", f"""apiVersion: inferenceextension.alibabacloud.com/v1alpha1
kind: InferenceTrafficPolicy
metadata: {{name: pd-bench}}
spec:
  poolRef: {{name: pd-bench}}
  modelServerRuntime: sglang
  profile:
    pd:
      trafficPolicy: {{prefixCache: {{mode: estimate}}}}
      pdRoleLabelName: {ROLE}
      kvTransfer: {{bootstrapPort: {BOOTSTRAP_PORT}}}""",
            f"apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: pd}}\nspec:\n"
            f"  listeners: [{{name: pd, protocol: HTTP, port: {OURS_PORT}}}]",
            """apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: pd}
spec:
  parentRefs: [{name: pd}]
  rules: [{backendRefs: [{kind: InferencePool, name: pd-bench}]}]"""]
    for side, addresses in (("prefill", prefill), ("decode", decode)):
        for i, address in enumerate(addresses):
            docs.append(f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {side}-{i}, labels: {{app: pd-bench, "
                        f"{ROLE}: {side}}}}}\nstatus: {{phase: Running, podIP: {address.split(':')[0]}}}")
    (directory / "pd.yaml").write_text("\n---\n".join(docs) + "\n")


def start_peer(prefill: list[str], decode: list[str], work_dir: Path,
               timeout_s: float = 60.0) -> subprocess.Popen[bytes]:
    """sglang-router in PD mode over the same pods, its cache-aware policy on both sides."""
    args = [sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation", "--host", "127.0.0.1",
            "--port", str(PEER_PORT), "--policy", "cache_aware", "--log-level", "warn",
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(PEER_PORT + 1),
            "--tokenizer-path", str(tokenizer_file(work_dir))]
    for p in prefill:
        args += ["--prefill", f"http://{p}", str(BOOTSTRAP_PORT)]
    for d in decode:
        args += ["--decode", f"http://{d}"]
    log = (work_dir / "sglang-router-pd.log").open("wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_routable(PEER_PORT, [proc], "sglang-router (PD)", work_dir, timeout_s)
    except TimeoutError:
        proc.kill()
        raise
    return proc


async def measure(url: str, prefill: list[str], workload: SharedPrefixWorkload, qps: float, duration_s: float,
                  seed: int) -> dict[str, Any]:
    before = await prefix_counters(prefill)
    started = time.monotonic()
    done = await arrivals.poisson(url, MODEL, workload.conversations(), qps, duration_s, workload.max_tokens, seed)
    elapsed = time.monotonic() - started
    after = await prefix_counters(prefill)
    ok = [s.result for s in done.sent if s.result.ok]
    ttfts = [r.ttft_s for r in ok]
    return {"requests": len(done.sent), "failed": len(done.sent) - len(ok),
            "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p90_s": percentile(ttfts, 0.9),
            "output_tokens_per_s": sum(r.output_tokens for r in ok) / elapsed,
            "prefill_hit_rate": hit_rate(before, after),
            "ttft_mean_s": statistics.fmean(ttfts) if ttfts else float("nan")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--qps", type=float, default=6.0)
    p.add_argument("--duration-s", type=float, default=40.0)
    p.add_argument("--time-scale", type=float, default=5.0)
    p.add_argument("--num-blocks", type=int, default=1200)
    p.add_argument("--seed", type=int, default=11)
    a = p.parse_args(argv)
    workload = SharedPrefixWorkload(groups=12, users=4, turns=6, system_words=1500, question_words=40, max_tokens=24)
    prefill, decode = pods("prefill", 2, 1), pods("decode", 2, 11)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "m").mkdir()
        write_manifests(work / "m", prefill, decode)
        fleet = Fleet(FleetSettings(manifests_dir=work / "m", work_dir=work / "fleet", redis_port=26390,
                                    picker_ports=(9402, 9403), picker_metrics_ports=(9412, 9413),
                                    picker_admin_ports=(), envoy_admin_port=9491, scrape_interval_ms=100,
                                    simulator_args=("--time-scale", str(a.time_scale), "--num-blocks",
                                                    str(a.num_blocks))))
        fleet.start()
        try:
            results["ours_pd"] = asyncio.run(measure(f"http://127.0.0.1:{OURS_PORT}", prefill, workload, a.qps,
                                                     a.duration_s, a.seed))
            for name in ("pods-sglang-prefill", "pods-sglang-decode"):  # fresh caches for the peer
                fleet.restart(name)
            fleet.wait_pods(60.0)
            peer = start_peer(prefill, decode, work)
            try:
                results["sglang_router_pd"] = asyncio.run(measure(f"http://127.0.0.1:{PEER_PORT}", prefill,
                                                                  workload, a.qps, a.duration_s, a.seed))
            finally:
                peer.terminate()
                peer.wait(10)
        finally:
            fleet.stop()
    print(f"\nSGLang PD, 2 prefill + 2 decode pods, time scale {a.time_scale:g}, {a.num_blocks} KV blocks per pod, "
          f"{a.qps:g} QPS for {a.duration_s:g} s (seed {a.seed})")
    print(f"{'router':<18} {'requests':>8} {'failed':>6} {'TTFT p50 s':>11} {'TTFT p90 s':>11} {'out tok/s':>10} "
          f"{'prefill hit':>11}")
    for name, r in results.items():
        print(f"{name:<18} {r['requests']:>8} {r['failed']:>6} {r['ttft_p50_s']:>11.3f} {r['ttft_p90_s']:>11.3f} "
              f"{r['output_tokens_per_s']:>10.1f} {r['prefill_hit_rate']:>11.3f}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "pd.json").write_text(json.dumps({"settings": vars(a), "results": results}, indent=1))


if __name__ == "__main__":
    main()
