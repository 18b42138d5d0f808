"""Figures for the gateway on this machine, measured in one run on one fleet:

1. latency the picker route (:8080, Envoy + ext_proc picker) adds over the plain
   route (:8081, Envoy round robin) to the same pods, at concurrency 1 and 16, with
   the part of it the pickers time themselves at concurrency 1 (their decision, and
   in it each Redis call: `picker_decision_seconds`, `picker_redis_call_seconds`);
   last, the same with the trivial ext_proc server (`benchmarks.extproc_floor`) in
   the pickers' place: what any ext_proc server on Python's gRPC adds behind this Envoy;
2. picker decisions per second of one picker process, driven over gRPC directly, and
   beside it the same figures of the trivial ext_proc server (`benchmarks.extproc_floor`):
   what the transport alone costs, so the difference is what routing costs;
3. prefix-cache hit rate of a multi-turn conversation test through each route,
   from the pods' own vllm:prefix_cache_* counters.

    .venv/bin/python -m benchmarks.gateway_figures [--requests 2000]

The simulated pods run at time scale 0.01 so that model time does not hide the
gateway's own cost in the latency figures. Writes bench/out/gateway_figures.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.driver import hit_rate, prefix_counters
from local_fleet.fleet import Fleet, FleetSettings
from testbed.kube import free_port

MODEL = "/models/Qwen3-32B"
POOL = "default/qwen-inference-pool"
PICKED, PLAIN = 8080, 8081


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def latencies(port: int, concurrency: int, requests: int) -> list[float]:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}).encode()
    out: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        async def worker(n: int) -> None:
            for _ in range(n):
                started = time.perf_counter()
                async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    assert r.status == 200, r.status
                out.append(time.perf_counter() - started)

        await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
    return out


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def decisions_per_second(address: str, pid: int, concurrency: int, seconds: float) -> dict[str, float]:
    """Ext_proc streams straight to one picker: headers, body, the decision, stream end.

    The client shares the machine's two cores, so besides the rate this reports
    the picker's own CPU per decision: the rate one picker sustains on one core.
    """
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 300}]}).encode()
    headers = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=":method", raw_value=b"POST"),
        base_pb2.HeaderValue(key=":path", raw_value=b"/v1/chat/completions")])))
    count = 0
    deadline = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)

        async def worker() -> None:
            nonlocal count
            while time.monotonic() < deadline:
                call = stub.Process(metadata=((("x-inference-pool", POOL),)))
                await call.write(headers)
                await call.read()
                await call.write(pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)))
                response = await call.read()
                assert response.WhichOneof("response") == "request_body", response
                await call.done_writing()
                count += 1

        started, cpu = time.monotonic(), cpu_seconds(pid)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed, used = time.monotonic() - started, cpu_seconds(pid) - cpu
    return {"decisions_per_s": count / elapsed, "cpu_ms_per_decision": used / count * 1000,
            "decisions_per_cpu_s": count / used}


async def wait_serving(address: str, timeout_s: float = 30.0) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout_s)


async def multi_turn_hit_rate(port: int, pods: list[str], conversations: int, turns: int) -> float:
    """Conversations that grow turn by turn under a shared system prompt, as the seeds' multi-turn test."""
    tag = uuid.uuid4().hex  # fresh text per run, so no route profits from the other's cache
    system = f"[{tag}] You are a helpful assistant for a text adventure. " + "Follow the rules of the game. " * 30
    before = await prefix_counters(pods)
    async with aiohttp.ClientSession() as http:
        async def conversation(c: int) -> None:
            messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
            for t in range(turns):
                messages.append({"role": "user", "content": f"User {c} turn {t}: " + "look around. " * 20})
                async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                     json={"model": MODEL, "messages": messages, "max_tokens": 24}) as r:
                    reply = await r.json()
                messages.append({"role": "assistant", "content": reply["choices"][0]["message"]["content"]})

        await asyncio.gather(*(conversation(c) for c in range(conversations)))
    return hit_rate(before, await prefix_counters(pods))


# The pickers' own timings of a request (their /metrics histograms): the decision (the lookup, scheduling
# and the admission) and each request-path Redis call in it, by histogram and the labels to match.
TIMED = {"decision": ("picker_decision_seconds", {}), "lookup": ("picker_redis_call_seconds", {"op": "lookup"}),
         "admit": ("picker_redis_call_seconds", {"op": "admit"})}


async def picker_timings(metrics_ports: list[int]) -> dict[str, tuple[float, float]]:
    """Each TIMED histogram's count and sum of seconds, over every picker replica."""
    out = dict.fromkeys(TIMED, (0.0, 0.0))
    async with aiohttp.ClientSession() as http:
        for port in metrics_ports:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                samples = [s for f in text_string_to_metric_families(await r.text()) for s in f.samples]
            for name, (metric, labels) in TIMED.items():
                count, total = (sum(s.value for s in samples if s.name == metric + suffix
                                    and labels.items() <= s.labels.items()) for suffix in ("_count", "_sum"))
                out[name] = (out[name][0] + count, out[name][1] + total)
    return out


async def route_latencies(requests: int, metrics_ports: list[int] | None = None) -> dict[str, Any]:
    """Plain route against the ext_proc route, at concurrency 1 and 16, turn about. With the pickers'
    metrics ports, also where the picker's share of a request went at concurrency 1: its mean decision
    and the mean of each Redis call in it, from the pickers' own histograms over that run."""
    await latencies(PICKED, 4, 200)  # warm connections and caches
    await latencies(PLAIN, 4, 200)
    out: dict[str, Any] = {}
    for concurrency in (1, 16):
        n = requests if concurrency == 16 else requests // 2
        plain = await latencies(PLAIN, concurrency, n)
        before = await picker_timings(metrics_ports) if metrics_ports and concurrency == 1 else None
        picked = await latencies(PICKED, concurrency, n)
        if metrics_ports and before is not None:
            after = await picker_timings(metrics_ports)
            out["picker_mean_ms_at_concurrency_1"] = {
                name: (after[name][1] - before[name][1]) / max(1.0, after[name][0] - before[name][0]) * 1000
                for name in TIMED}
        row: dict[str, Any] = {}
        for name, values in (("plain_8081", plain), ("picker_8080", picked)):
            row[name] = {"p50": percentile(values, 0.5) * 1000, "p99": percentile(values, 0.99) * 1000,
                         "req_per_s": len(values) / sum(values) * concurrency}
        row["added_p50"] = row["picker_8080"]["p50"] - row["plain_8081"]["p50"]
        row["added_p99"] = row["picker_8080"]["p99"] - row["plain_8081"]["p99"]
        row["throughput_share"] = row["picker_8080"]["req_per_s"] / row["plain_8081"]["req_per_s"]
        out[f"concurrency_{concurrency}"] = row
    return out


@asynccontextmanager
async def trivial_servers(fleet: Fleet, destination: str) -> AsyncIterator[None]:
    """The pickers stop and trivial ext_proc servers (`benchmarks.extproc_floor`) take their ports,
    sending every request to `destination` (several, comma-separated: in turn), until the block ends;
    the pickers stay stopped."""
    servers = start_trivial_servers(fleet, destination)
    try:
        for port in fleet.settings.picker_ports:
            await wait_serving(f"127.0.0.1:{port}")
        fleet.wait_envoy_routes_to_pickers()
        yield
    finally:
        stop_trivial_servers(servers)


def start_trivial_servers(fleet: Fleet, destination: str) -> list[subprocess.Popen[bytes]]:
    """`trivial_servers`' first half, for callers without an event loop (they wait for Envoy's route)."""
    for i in range(len(fleet.settings.picker_ports)):
        fleet.kill(f"picker-{i}")
    return [subprocess.Popen([sys.executable, "-m", "benchmarks.extproc_floor", "--port", str(port),
                              "--destination", destination]) for port in fleet.settings.picker_ports]


def stop_trivial_servers(servers: list[subprocess.Popen[bytes]]) -> None:
    for server in servers:
        server.terminate()
        server.wait(10)


def ext_proc_streams(fleet: Fleet) -> int:
    """Envoy's ext_proc streams so far: a request that passed the servers on the failure mode opens none."""
    return fleet.envoy_counter(r"ext_proc\..*streams_started")


async def trivial_route_latencies(fleet: Fleet, requests: int) -> dict[str, Any]:
    """The pickers' routes with trivial ext_proc servers in their place, all sending to one pod."""
    async with trivial_servers(fleet, next(iter(fleet.pods()))):
        before = ext_proc_streams(fleet)
        figures = await route_latencies(requests)
        assert ext_proc_streams(fleet) - before >= requests + requests // 2, "requests bypassed ext_proc"
        return figures


async def measure(fleet: Fleet, requests: int) -> dict[str, Any]:
    pods = list(fleet.pods())
    result: dict[str, Any] = {"latency_ms": await route_latencies(requests, list(fleet.settings.picker_metrics_ports))}
    address, pid = f"127.0.0.1:{fleet.settings.picker_ports[0]}", fleet.processes["picker-0"].pid
    port = free_port()
    floor = subprocess.Popen([sys.executable, "-m", "benchmarks.extproc_floor", "--port", str(port)])
    try:
        await wait_serving(f"127.0.0.1:{port}")
        result["picker_decisions"], result["extproc_floor"] = {}, {}
        for c in (1, 16, 64):  # side by side, so the machine's mood weighs on both alike
            result["picker_decisions"][f"concurrency_{c}"] = await decisions_per_second(address, pid, c, 5.0)
            result["extproc_floor"][f"concurrency_{c}"] = await decisions_per_second(
                f"127.0.0.1:{port}", floor.pid, c, 5.0)
    finally:
        floor.terminate()
        floor.wait(10)
    result["multi_turn_hit_rate"] = {
        "picker_8080": await multi_turn_hit_rate(PICKED, pods, conversations=16, turns=6),
        "plain_8081": await multi_turn_hit_rate(PLAIN, pods, conversations=16, turns=6),
    }
    result["trivial_ext_proc_latency_ms"] = await trivial_route_latencies(fleet, requests)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000, help="requests per route at concurrency 16")
    p.add_argument("--manifests", type=Path, default=Path("examples/fleet"))
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gateway-figures-"))
    fleet = Fleet(FleetSettings(manifests_dir=args.manifests.resolve(), work_dir=work,
                                simulator_args=("--time-scale", "0.01")))
    try:
        fleet.start()
        result = asyncio.run(measure(fleet, args.requests))
    finally:
        fleet.stop()
    out = Path("bench/out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "gateway_figures.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print("\nroute                      conc   p50 ms   p99 ms   req/s  share of plain")
    for label, lat in (("picker", result["latency_ms"]), ("trivial ext_proc", result["trivial_ext_proc_latency_ms"])):
        for c in ("concurrency_1", "concurrency_16"):
            for name in ("plain_8081", "picker_8080"):
                r = lat[c][name]
                shown = f"{label} :8080" if name == "picker_8080" else "plain :8081"
                print(f"{shown:<26} {c.split('_')[1]:>4} {r['p50']:8.2f} {r['p99']:8.2f} {r['req_per_s']:7.0f}"
                      + (f" {lat[c]['throughput_share']:10.2f}" if name == "picker_8080" else ""))
            print(f"{'added by ' + label:<26} {c.split('_')[1]:>4} {lat[c]['added_p50']:8.2f}"
                  f" {lat[c]['added_p99']:8.2f}")
    timings = result["latency_ms"]["picker_mean_ms_at_concurrency_1"]
    print("the picker's own at concurrency 1, mean ms: " + ", ".join(f"{k} {v:.3f}" for k, v in timings.items())
          + " (the decision holds the two Redis calls)")
    print("\ngRPC direct            conc  decisions/s  CPU ms/decision  decisions per CPU-second")
    for c, r in result["picker_decisions"].items():
        f = result["extproc_floor"][c]
        for name, row in (("picker", r), ("trivial ext_proc", f)):
            print(f"{name:<20} {c.split('_')[1]:>5} {row['decisions_per_s']:12.0f}"
                  f" {row['cpu_ms_per_decision']:16.3f} {row['decisions_per_cpu_s']:12.0f}")
        print(f"{'routing (difference)':<20} {c.split('_')[1]:>5} {'':>12}"
              f" {r['cpu_ms_per_decision'] - f['cpu_ms_per_decision']:16.3f}")
    print("multi-turn prefix-cache hit rate:", {k: round(v, 3) for k, v in result["multi_turn_hit_rate"].items()})


if __name__ == "__main__":
    main()
