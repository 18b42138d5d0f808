"""The shared state's capacity model, measured against a real Redis:

1. per decision on the real request path (the example fleet: Envoy-less gRPC straight to
   one picker, its collector, controller and the other picker running; PER_POD requests at
   a time for each pod of the pool, below flow control's saturation rule, so no decision
   queues and the figure is the decision's alone): Redis commands,
   Lua time, bytes in and out, and Redis CPU, net of the fleet's background traffic
   measured idle for as long; with `--manifests examples/kv-events` (a pool indexed from
   the engines' KV-cache events) also the collectors' event writes over the same window,
   per engine block, and the request path's share without them;
2. per script (a standalone Redis, one pool of 8 endpoints, 2 picker replicas, a prompt
   of 32 blocks): Lua time and bytes of LOOKUP, ADMIT, INDEX and RELEASE, and of the
   index built from events: LOOKUP with speculative entries, the speculative write, and
   a batch of events (holders, block map, status) per batch and per block;
3. the prefix index at full capacity: keys and memory per pod whose LRU is full (every
   block its own, the worst case), scaled to 1,000 pods;
4. how many Redis Cluster shards carry 100,000 decisions per second.

    .venv/bin/python -m benchmarks.capacity [--decisions 3000] [--pods 8]

Writes bench/out/capacity.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from redis.asyncio import Redis

from benchmarks.gateway_figures import cpu_seconds
from controller.desired import build
from controller.resources import load_directory
from gateway_state.keys import index_bucket
from gateway_state.kv_index_store import Removed, Stored
from gateway_state.placement_store import Option, SpeculativeWrite
from gateway_state.protocol import DESTINATION_HEADER
from gateway_state.records import Config, Endpoint, KvStreamStatus, Pool
from gateway_state.store import StateStore
from local_fleet.fleet import Fleet, FleetSettings, binary, free_cluster_ports
from testbed.kube import free_port

POOL = "default/qwen-inference-pool"  # the per-script figures' pool
MODEL = "/models/Qwen3-32B"
# A typical chat request: a shared system prompt of about 1,500 characters and a question.
SYSTEM = "You are a support assistant for an online shop. Answer briefly and politely. " * 20
STATUS = KvStreamStatus("capacity", "live", 0)  # what each batch of events writes beside its operations
# Requests in flight at a time per pod of the pool. Below the saturation rule's default queue of 5
# (records.FlowControl.saturation_waiting): at the benchmark's time scale a request lasts a few ms, so a
# pod's scraped load rarely shows it running, and more per pod would send decisions through flow
# control's queue (three more calls each) instead of measuring a decision.
PER_POD = 4
# The share of a Redis core a shard is planned at, leaving room for replication, persistence and bursts.
SHARD_CORE_SHARE = 0.7


async def redis_figures(redis: Redis, pid: int) -> dict[str, Any]:
    """Command calls and microseconds by command, bytes in and out, and the server's CPU seconds."""
    commands = await redis.info("commandstats")
    stats = await redis.info("stats")
    return {"commands": {name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
                         for name, v in commands.items()},
            "bytes_in": int(stats["total_net_input_bytes"]), "bytes_out": int(stats["total_net_output_bytes"]),
            "cpu_s": cpu_seconds(pid)}


def difference(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    names = set(after["commands"]) | set(before["commands"])
    commands = {}
    for n in names:
        a, b = after["commands"].get(n, (0, 0)), before["commands"].get(n, (0, 0))
        if a[0] - b[0]:
            commands[n] = (a[0] - b[0], a[1] - b[1])
    return {"commands": commands, "bytes_in": after["bytes_in"] - before["bytes_in"],
            "bytes_out": after["bytes_out"] - before["bytes_out"], "cpu_s": after["cpu_s"] - before["cpu_s"]}


async def window(redis: Redis, pid: int, work: Any) -> tuple[dict[str, Any], float]:
    """Redis's figures over the run of `work()`, and its length in seconds."""
    before, started = await redis_figures(redis, pid), time.monotonic()
    await work()
    elapsed = time.monotonic() - started
    return difference(await redis_figures(redis, pid), before), elapsed


async def decisions(address: str, count: int, concurrency: int, pool: str, forward: bool = False,
                    system_prompts: int = 1) -> None:
    """`count` ext_proc decisions straight to one picker, each a chat request whose question differs, over
    `system_prompts` system prompts in turn (they differ from their first characters: one tenant's each).
    `forward`: each request then goes to the pod the picker named, as the gateway would send it (so the
    engines cache its prompt and publish their KV-cache events)."""
    headers = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=":method", raw_value=b"POST"),
        base_pb2.HeaderValue(key=":path", raw_value=b"/v1/chat/completions")])))
    tag = uuid.uuid4().hex
    left = iter(range(count))
    async with grpc.aio.insecure_channel(address) as channel, aiohttp.ClientSession() as http:
        stub = pb_grpc.ExternalProcessorStub(channel)

        async def worker() -> None:
            for n in left:
                body = json.dumps({"model": MODEL, "max_tokens": 32, "messages": [
                    {"role": "system", "content": f"Tenant {n % system_prompts}. {SYSTEM}"
                     if system_prompts > 1 else SYSTEM},
                    {"role": "user", "content": f"[{tag}] Question {n}: where is my order number {n * 7919}?"}]})
                call = stub.Process(metadata=((("x-inference-pool", pool),)))
                await call.write(headers)
                await call.read()
                await call.write(pb.ProcessingRequest(request_body=pb.HttpBody(body=body.encode(),
                                                                               end_of_stream=True)))
                response = await call.read()
                assert response.WhichOneof("response") == "request_body", response
                if forward:
                    headers_set = response.request_body.response.header_mutation.set_headers
                    pod = next(h.header.raw_value.decode() for h in headers_set
                               if h.header.key == DESTINATION_HEADER).split(",")[0]
                    async with http.post(f"http://{pod}/v1/chat/completions", data=body,
                                         headers={"content-type": "application/json"}) as answer:
                        assert answer.status == 200, await answer.text()
                await call.done_writing()
                await call.read()  # the stream's end: the picker has released the request

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def event_counters(fleet: Fleet) -> tuple[float, float]:
    """The collector's KV-event batches and blocks applied so far (0, 0 without a metrics port)."""
    if not fleet.settings.collector_metrics_ports:
        return 0.0, 0.0
    with urllib.request.urlopen(f"http://127.0.0.1:{fleet.settings.collector_metrics_ports[0]}/metrics") as r:
        text = r.read().decode()
    def total(name: str) -> float:
        return sum(float(m) for m in re.findall(rf"^{name}_total{{[^}}]*}} (\S+)$", text, re.M))
    return total("collector_kv_event_batches"), total("collector_kv_event_blocks")


def concurrency(fleet: Fleet, pool: str) -> int:
    """PER_POD requests at a time for each of the pool's pods."""
    return PER_POD * len(build(load_directory(fleet.settings.manifests_dir)).pools[pool].endpoints)


async def per_decision(fleet: Fleet, count: int, forward: bool) -> dict[str, Any]:
    redis = Redis.from_url(fleet.redis_url)
    pid = fleet.processes["redis"].pid
    address = f"127.0.0.1:{fleet.settings.picker_ports[0]}"
    pool = fleet.first_pool()
    at_once = concurrency(fleet, pool)
    try:
        await decisions(address, 200, 8, pool, forward)  # warm: the shared system prompt's blocks are indexed
        await asyncio.sleep(1.0)
        events_before = event_counters(fleet)
        lags: list[float] = []
        sampling = asyncio.create_task(sample_lags(StateStore(redis), pool, lags))
        busy, busy_s = await window(redis, pid, lambda: decisions(address, count, at_once, pool, forward))
        sampling.cancel()
        await asyncio.sleep(1.0)  # the last index writes land
        events_after = event_counters(fleet)
        idle, idle_s = await window(redis, pid, lambda: asyncio.sleep(max(busy_s, 5.0)))
    finally:
        await redis.aclose()
    scale = busy_s / idle_s  # the background traffic over the busy window
    commands = {}
    for name, (calls, usec) in busy["commands"].items():
        bg_calls, bg_usec = idle["commands"].get(name, (0, 0))
        calls_net, usec_net = calls - bg_calls * scale, usec - bg_usec * scale
        if calls_net / count >= 0.01:
            commands[name] = {"calls": calls_net / count, "usec": usec_net / count}
    return {
        "decisions": count, "concurrency": at_once, "seconds": busy_s, "decisions_per_s": count / busy_s,
        "commands_per_decision": commands,
        # Redis counts the commands a script runs, and their time, under their own names too.
        "calls_per_decision": sum(c["calls"] for c in commands.values()),
        "bytes_in_per_decision": (busy["bytes_in"] - idle["bytes_in"] * scale) / count,
        "bytes_out_per_decision": (busy["bytes_out"] - idle["bytes_out"] * scale) / count,
        "redis_cpu_ms_per_decision": (busy["cpu_s"] - idle["cpu_s"] * scale) / count * 1000,
        "background": {"redis_cpu_ms_per_s": idle["cpu_s"] / idle_s * 1000,
                       "calls_per_s": sum(c for c, _ in idle["commands"].values()) / idle_s},
        # The collectors' KV-event writes the decisions caused (their batches and blocks, from its metrics).
        "kv_event_batches_per_decision": (events_after[0] - events_before[0]) / count,
        "kv_event_blocks_per_decision": (events_after[1] - events_before[1]) / count,
        # From an engine's timestamp on a batch to the collector's applying it (sampled every 50 ms).
        "kv_event_lag_ms": {"samples": len(lags), "p50": percentile(lags, 0.5), "p99": percentile(lags, 0.99),
                            "max": max(lags, default=0.0)},
    }


async def sample_lags(store: StateStore, pool: str, out: list[float]) -> None:
    """Each new batch's lag, as the collectors record it in the streams' statuses."""
    seen: dict[str, int] = {}
    while True:
        for endpoint, status in (await store.kv_statuses(pool)).items():
            if status.seq != seen.get(endpoint, status.seq):
                out.append(status.lag_ms)
            seen[endpoint] = status.seq
        await asyncio.sleep(0.05)


async def shard_figures(fleet: Fleet, count: int, system_prompts: int) -> dict[str, Any]:
    """Redis CPU per decision on each shard of the fleet's Redis Cluster, net of the background, with
    prompts over `system_prompts` system prompts (one pool: its own keys on one shard, its index spread)."""
    ports = fleet.settings.redis_cluster_ports
    nodes = {port: Redis(port=port) for port in ports}
    pids = {port: fleet.processes[f"redis-{port}"].pid for port in ports}
    address = f"127.0.0.1:{fleet.settings.picker_ports[0]}"
    pool = fleet.first_pool()

    async def measure(work: Any) -> tuple[dict[int, dict[str, Any]], float]:
        before, started = {p: await redis_figures(nodes[p], pids[p]) for p in ports}, time.monotonic()
        await work()
        elapsed = time.monotonic() - started
        return {p: difference(await redis_figures(nodes[p], pids[p]), before[p]) for p in ports}, elapsed

    try:
        await decisions(address, 200, 8, pool, system_prompts=system_prompts)
        await asyncio.sleep(1.0)
        at_once = concurrency(fleet, pool)
        busy, busy_s = await measure(lambda: decisions(address, count, at_once, pool,
                                                       system_prompts=system_prompts))
        await asyncio.sleep(1.0)
        idle, idle_s = await measure(lambda: asyncio.sleep(max(busy_s, 5.0)))
        pool_slot = int(await nodes[ports[0]].execute_command("CLUSTER", "KEYSLOT", f"{{{pool}}}"))
        shards = []
        for port in ports:
            owned = await nodes[port].execute_command("CLUSTER", "COUNTKEYSINSLOT", pool_slot)
            net_ms = (busy[port]["cpu_s"] - idle[port]["cpu_s"] * busy_s / idle_s) / count * 1000
            calls = busy[port]["commands"].get("evalsha", (0, 0))[0] / count
            shards.append({"port": port, "redis_cpu_ms_per_decision": net_ms, "script_calls_per_decision": calls,
                           "holds_pool_keys": int(owned) > 0})
    finally:
        for node in nodes.values():
            await node.aclose()
    total = sum(s["redis_cpu_ms_per_decision"] for s in shards)
    for s in shards:
        s["share"] = s["redis_cpu_ms_per_decision"] / total if total > 0 else 0.0
    return {"decisions": count, "system_prompts": system_prompts, "decisions_per_s": count / busy_s,
            "redis_cpu_ms_per_decision": total, "shards": shards}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


class StandaloneRedis:
    """A redis-server of its own, without persistence, for the per-script and memory figures."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="capacity-redis-"))
        self.proc = subprocess.Popen([binary("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no", "--dir", str(self.dir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    async def client(self) -> Redis:
        redis = Redis(port=self.port)
        for _ in range(100):
            try:
                await redis.ping()
                return redis
            except OSError:
                await asyncio.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def hashes(n: int, tag: str) -> list[str]:
    return [f"{tag}{i:012x}"[-16:] for i in range(n)]


async def per_script(redis: Redis, pid: int, calls: int, pods: int) -> dict[str, Any]:
    store = StateStore(redis)
    endpoints = tuple(Endpoint(f"pod-{i}", f"10.0.0.{i + 1}", 8000) for i in range(pods))
    pool = Pool(POOL, (8000,), endpoints=endpoints)
    await store.write_config(Config(1, {POOL: pool}, {}), await store.lead("capacity", 60_000))
    for replica in ("picker-a", "picker-b"):
        await store.publish(POOL, replica, 60_000, {endpoints[0].key: 1})
    prompt = hashes(32, "a")
    for e in endpoints[:3]:  # the prompt's blocks are held by three endpoints
        await store.index(POOL, e.key, prompt, 600_000, 29_000)
    out = {}

    async def run(name: str, call: Any) -> None:
        async def work() -> None:
            for n in range(calls):
                await call(n)
        figures, _ = await window(redis, pid, work)
        usec = sum(u for c, (k, u) in figures["commands"].items() if c in ("evalsha", "eval", "fcall"))
        out[name] = {"lua_usec": usec / calls, "bytes_in": figures["bytes_in"] / calls,
                     "bytes_out": figures["bytes_out"] / calls,
                     "redis_cpu_usec": figures["cpu_s"] / calls * 1e6}

    key = endpoints[3].key
    await run("lookup (32 blocks, 3 holders)", lambda n: store.lookup(POOL, prompt, "picker-a"))
    # With uncached blocks at a measured speed: the endpoint's prefill backlog is drained and added to.
    await run("admit", lambda n: store.admit(POOL, "picker-a", [Option(key, 4, blocks_per_s=2500.0)], 60_000, MODEL))
    await run("release", lambda n: store.release(POOL, "picker-a", key, 4, MODEL))
    await run("index (32 blocks)", lambda n: store.index(POOL, key, prompt, 600_000, 29_000))
    # What a decision writes now: a prompt the endpoint held (its recency young), and one grown by a turn.
    await run("index, held (32 blocks)", lambda n: store.index(POOL, key, prompt, 600_000, 29_000, 32))
    await run("index, 28 held + 4 new", lambda n: store.index(
        POOL, key, prompt[:28] + hashes(4, f"n{n}-"), 600_000, 29_000, 28))
    # A lookup's cost with 16 picker replicas instead of 2: it reads the pool's total, not their records.
    for i in range(14):
        await store.publish(POOL, f"picker-{i}", 60_000, {endpoints[i % pods].key: 1})
    await run("lookup, 16 replicas", lambda n: store.lookup(POOL, prompt, "picker-a"))
    # The index built from engine events: three endpoints hold the prompt by their engines' word.
    events = hashes(32, "e")
    for i, e in enumerate(endpoints[:3]):
        await store.kv_apply(POOL, e.key, [Stored(f"{i}-{j}", h, index_bucket(events[0]))
                                           for j, h in enumerate(events)], STATUS)
    await run("lookup, events (32 blocks, 3 holders)", lambda n: store.lookup(POOL, events, "picker-a", True))
    await run("speculative write (4 blocks)",
              lambda n: store.write(POOL, [SpeculativeWrite(key, events[28:], 2000, index_bucket(events[0]))]))
    await run("kv_apply (1 block stored)",
              lambda n: store.kv_apply(POOL, key, [Stored(f"x{n}", hashes(1, f"s{n}")[0], n % 16)], STATUS))
    await run("kv_apply (16 blocks stored)", lambda n: store.kv_apply(
        POOL, key, [Stored(f"y{n}-{j}", h, n % 16) for j, h in enumerate(hashes(16, f"t{n}"))], STATUS))
    await run("kv_apply (16 blocks removed)", lambda n: store.kv_apply(
        POOL, key, [Removed(f"y{n}-{j}", h, n % 16) for j, h in enumerate(hashes(16, f"t{n}"))], STATUS))
    return out


async def index_memory(redis: Redis, pods: int, capacity: int) -> dict[str, Any]:
    """Fill `pods` endpoints' LRUs to `capacity` blocks, each block held by one endpoint only."""
    store = StateStore(redis)
    await redis.flushall()
    before = (await redis.info("memory"))["used_memory"]
    keys_before = await redis.dbsize()
    batch = 256
    for p in range(pods):
        endpoint = f"10.1.{p // 250}.{p % 250 + 1}:8000"
        for start in range(0, capacity, batch):
            block = [f"{p:04x}{i:012x}" for i in range(start, min(capacity, start + batch))]
            await store.index(POOL, endpoint, block, 600_000, capacity)
    memory = (await redis.info("memory"))["used_memory"] - before
    keys = await redis.dbsize() - keys_before
    return {"pods": pods, "blocks_per_pod": capacity, "keys_per_pod": keys / pods,
            "bytes_per_pod": memory / pods, "bytes_per_block": memory / (pods * capacity),
            "keys_per_1000_pods": keys / pods * 1000, "gib_per_1000_pods": memory / pods * 1000 / 2 ** 30}


async def standalone(calls: int, memory_pods: int, capacity: int) -> dict[str, Any]:
    server = StandaloneRedis()
    try:
        redis = await server.client()
        try:
            scripts = await per_script(redis, server.proc.pid, calls, 8)
            memory = await index_memory(redis, memory_pods, capacity)
        finally:
            await redis.aclose()
    finally:
        server.stop()
    return {"per_script": scripts, "index_memory": memory}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decisions", type=int, default=3000)
    p.add_argument("--script-calls", type=int, default=2000)
    p.add_argument("--pods", type=int, default=8, help="pods whose prefix LRU is filled for the memory figure")
    p.add_argument("--capacity", type=int, default=29_000,
                   help="prefix blocks per pod at full capacity (the simulator's 29,000 KV blocks of 16 tokens "
                        "hold 29,000 blocks of 64 characters)")
    p.add_argument("--manifests", type=Path, default=Path("examples/fleet"))
    p.add_argument("--forward", action="store_true",
                   help="send each request on to the pod the picker named (the engines then publish KV events)")
    p.add_argument("--cluster-prompts", type=int, default=64,
                   help="system prompts of the decisions on a 3-shard Redis Cluster (0: no cluster figures)")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="capacity-"))
    fleet = Fleet(FleetSettings(manifests_dir=a.manifests.resolve(), work_dir=work,
                                simulator_args=("--time-scale", "0.01"), collector_metrics_ports=(free_port(),)))
    try:
        fleet.start()
        result: dict[str, Any] = {"per_decision": asyncio.run(per_decision(fleet, a.decisions, a.forward))}
    finally:
        fleet.stop()
        shutil.rmtree(work, ignore_errors=True)
    result.update(asyncio.run(standalone(a.script_calls, a.pods, a.capacity)))
    if a.cluster_prompts:
        work = Path(tempfile.mkdtemp(prefix="capacity-cluster-"))
        fleet = Fleet(FleetSettings(manifests_dir=a.manifests.resolve(), work_dir=work,
                                    simulator_args=("--time-scale", "0.01"), redis_cluster_ports=free_cluster_ports(3)))
        try:
            fleet.start()
            result["cluster"] = [asyncio.run(shard_figures(fleet, a.decisions, n)) for n in (1, a.cluster_prompts)]
        finally:
            fleet.stop()
            shutil.rmtree(work, ignore_errors=True)
    d = result["per_decision"]
    if d["kv_event_batches_per_decision"]:  # the collectors' event writes, by the per-script figures
        s = result["per_script"]
        per_block = (s["kv_apply (16 blocks stored)"]["redis_cpu_usec"]
                     - s["kv_apply (1 block stored)"]["redis_cpu_usec"]) / 15
        per_batch = s["kv_apply (1 block stored)"]["redis_cpu_usec"] - per_block
        events_ms = (d["kv_event_batches_per_decision"] * per_batch
                     + d["kv_event_blocks_per_decision"] * per_block) / 1000
        d["kv_event_writes"] = {"redis_cpu_usec_per_batch": per_batch, "redis_cpu_usec_per_block": per_block,
                                "redis_cpu_ms_per_decision": events_ms}
        d["request_path_redis_cpu_ms_per_decision"] = d["redis_cpu_ms_per_decision"] - events_ms
    per_shard = SHARD_CORE_SHARE / (d["redis_cpu_ms_per_decision"] / 1000)
    result["shards"] = {"decisions_per_s_per_shard": per_shard, "core_share": SHARD_CORE_SHARE,
                        "shards_for_100k_per_s": math.ceil(100_000 / per_shard)}
    out = Path("bench/out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "capacity.json").write_text(json.dumps(result, indent=2))
    print_tables(result)


def print_tables(r: dict[str, Any]) -> None:
    d = r["per_decision"]
    print(f"per decision, real request path ({d['decisions']} decisions at {d['decisions_per_s']:.0f}/s, "
          f"{d['concurrency']} at a time, "
          "net of the fleet's background traffic):")
    print(f"  {'command':<12} {'calls':>6} {'usec':>8}")
    for name, c in sorted(d["commands_per_decision"].items(), key=lambda kv: -kv[1]["usec"]):
        print(f"  {name:<12} {c['calls']:6.2f} {c['usec']:8.1f}")
    scripts = d["commands_per_decision"].get("evalsha", {"calls": 0.0, "usec": 0.0})
    print(f"  total: {scripts['calls']:.2f} round trips (EVALSHA), {d['calls_per_decision'] - scripts['calls']:.0f} "
          f"commands inside the scripts, {scripts['usec']:.0f} us of Lua, "
          f"{d['bytes_in_per_decision']:.0f} B in, {d['bytes_out_per_decision']:.0f} B out, "
          f"{d['redis_cpu_ms_per_decision'] * 1000:.0f} us of Redis CPU")
    print(f"  background (idle fleet): {d['background']['calls_per_s']:.0f} commands/s, "
          f"{d['background']['redis_cpu_ms_per_s']:.1f} ms of Redis CPU per s")
    if "kv_event_writes" in d:
        k = d["kv_event_writes"]
        print(f"  of which the collectors' KV-event writes: {d['kv_event_batches_per_decision']:.2f} batches and "
              f"{d['kv_event_blocks_per_decision']:.1f} engine blocks per decision, "
              f"{k['redis_cpu_usec_per_batch']:.0f} us per batch + {k['redis_cpu_usec_per_block']:.1f} us per block "
              f"= {k['redis_cpu_ms_per_decision'] * 1000:.0f} us; the request path: "
              f"{d['request_path_redis_cpu_ms_per_decision'] * 1000:.0f} us of Redis CPU per decision")
        lag = d["kv_event_lag_ms"]
        print(f"  KV-event lag (engine's timestamp to the index, {lag['samples']} batches sampled): "
              f"p50 {lag['p50']:.1f} ms, p99 {lag['p99']:.1f} ms, max {lag['max']:.1f} ms")
    print("\nper script (standalone Redis, 8 endpoints, 2 replicas):")
    print(f"  {'script':<30} {'Lua us':>7} {'CPU us':>7} {'B in':>6} {'B out':>6}")
    for name, s in r["per_script"].items():
        print(f"  {name:<30} {s['lua_usec']:7.1f} {s['redis_cpu_usec']:7.1f} "
              f"{s['bytes_in']:6.0f} {s['bytes_out']:6.0f}")
    m = r["index_memory"]
    print(f"\nprefix index at full capacity ({m['pods']} pods x {m['blocks_per_pod']} blocks, each its own):")
    print(f"  {m['keys_per_pod']:.0f} keys and {m['bytes_per_pod'] / 2 ** 20:.1f} MiB per pod "
          f"({m['bytes_per_block']:.0f} B per block); per 1,000 pods: {m['keys_per_1000_pods'] / 1e6:.1f} M keys, "
          f"{m['gib_per_1000_pods']:.1f} GiB")
    for c in r.get("cluster", ()):
        print(f"\none pool on a 3-shard Redis Cluster, {c['decisions']} decisions at {c['decisions_per_s']:.0f}/s over "
              f"{c['system_prompts']} system prompt(s): {c['redis_cpu_ms_per_decision'] * 1000:.0f} us of Redis CPU "
              "per decision in all")
        for shard in c["shards"]:
            role = " (the pool's own keys)" if shard["holds_pool_keys"] else ""
            print(f"  shard :{shard['port']}{role}: "
                  f"{shard['redis_cpu_ms_per_decision'] * 1000:.0f} us per decision ({shard['share']:.0%}), "
                  f"{shard['script_calls_per_decision']:.2f} script calls")
    s = r["shards"]
    print(f"\nshards: {s['decisions_per_s_per_shard']:.0f} decisions/s per shard at {s['core_share']:.0%} of a core; "
          f"{s['shards_for_100k_per_s']} shards for 100,000 decisions/s")


if __name__ == "__main__":
    main()
