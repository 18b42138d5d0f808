"""Where a picker's CPU per decision goes, with the transport set apart.

A picker is wired in this process as its entry point wires it (`picker.main.build`),
against the example fleet's Redis, controller, collector and pods, and its ext_proc
handler is driven directly, without gRPC: the same messages Envoy sends (headers,
then the body), the stream's end. Three figures, in one run:

1. the handler's CPU per decision (this process, heartbeat and snapshot refresh
   running), at 1 and 16 streams at once, and the background's CPU per second idle;
2. the same, one stage at a time: the body read (`intake`), the state's lookup,
   scheduling, admission, the answer built, the release;
3. a profile of the handler (cProfile on the process's CPU clock), its top
   functions by own time.

    .venv/bin/python -m benchmarks.decision_profile [--decisions 3000] [--top 30] [--pods N]

`--pods N`: the example fleet's pool with N pods instead of its four (copies of its
first pod on loopback addresses), for how a decision's cost grows with the pool.

What gRPC itself costs per decision is `benchmarks.gateway_figures`' trivial server.
Writes bench/out/decision_profile.json.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvloop
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from gateway_state.lifecycle import every
from gateway_state.protocol import POOL_METADATA_KEY
from local_fleet.fleet import Fleet, FleetSettings
from picker.director import Arrival
from picker.main import Picker, build, parse_settings
from picker.placement import Placements
from picker.roles import Role

MODEL = "/models/Qwen3-32B"
# The gateway_figures body: a short chat whose prompt is a few prefix blocks.
BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 300}]}).encode()
HEADERS = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
    base_pb2.HeaderValue(key=":method", raw_value=b"POST"),
    base_pb2.HeaderValue(key=":path", raw_value=b"/v1/chat/completions")])))
BODY_MESSAGE = pb.ProcessingRequest(request_body=pb.HttpBody(body=BODY, end_of_stream=True))


class _Context:
    """What the handler asks of a gRPC server context."""

    def __init__(self, pool: str) -> None:
        self._metadata = ((POOL_METADATA_KEY, pool),)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def abort(self, code: object, details: str) -> None:
        raise RuntimeError(f"aborted: {code} {details}")


async def _messages() -> AsyncIterator[pb.ProcessingRequest]:
    yield HEADERS
    yield BODY_MESSAGE


async def one_decision(picker: Picker, context: _Context) -> None:
    answers = [a async for a in picker.processor.Process(_messages(), context)]
    assert answers[-1].WhichOneof("response") == "request_body", answers[-1]


async def run_decisions(picker: Picker, pool: str, count: int, concurrency: int) -> dict[str, float]:
    context = _Context(pool)
    left = iter(range(count))

    async def worker() -> None:
        for _ in left:
            await one_decision(picker, context)

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"decisions": count, "concurrency": concurrency, "cpu_ms_per_decision": cpu / count * 1000,
            "decisions_per_s": count / wall}


async def stages(picker: Picker, pool: str, count: int) -> dict[str, float]:
    """CPU per decision of each stage of the sequence, one request at a time."""
    director, placement = picker.director, picker.placement
    snapshot = picker.snapshots.current
    arrival = Arrival(pool, "/v1/chat/completions", BODY)
    names = ("intake", "lookup", "candidates and schedule", "admit", "answer", "release")
    totals = dict.fromkeys(names, 0.0)
    me = picker.settings.server.replica_id
    for _ in range(count):
        t0 = time.process_time()
        request = director.read(arrival)
        t1 = time.process_time()
        await picker.store.lookup(pool, request.block_hashes, me)
        t2 = time.process_time()
        plan = await placement.plan(request, snapshot.load.get(pool, {}), True, snapshot.drained.get(pool, frozenset()))
        t3 = time.process_time()
        placed = await placement.commit(plan, time.perf_counter())
        t4 = time.process_time()
        assert placed is not None
        answer = director.answer(arrival, request, Placements({Role.PRIMARY: placed}, []))
        t5 = time.process_time()
        director.finish(answer)
        await asyncio.sleep(0)  # the release's write goes
        t6 = time.process_time()
        for name, spent in zip(names, (t1 - t0, t2 - t1, (t3 - t2) - (t2 - t1), t4 - t3, t5 - t4, t6 - t5),
                               strict=True):
            totals[name] += spent
    return {k: v / count * 1000 for k, v in totals.items()}


def _top(profile: cProfile.Profile, top: int) -> str:
    """The profile's top functions by own time, then by cumulative time."""
    text = io.StringIO()
    stats = pstats.Stats(profile, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return text.getvalue()


async def measure(redis_url: str, pool: str, decisions: int, top: int, picker_args: list[str]) -> dict[str, Any]:
    settings = parse_settings(["--no-secure-serving", "--replica-id", "profile", "--redis-url", redis_url,
                               "--log-level", "INFO", *picker_args])
    picker = build(settings)
    stop = asyncio.Event()
    await picker.snapshots.refresh_once()
    tasks = [asyncio.create_task(picker.snapshots.run(stop)),
             asyncio.create_task(every(settings.state.heartbeat_interval_ms / 1000, stop, picker.heartbeat))]
    try:
        await run_decisions(picker, pool, 300, 4)  # warm: the prompt's blocks are indexed, caches filled
        cpu = time.process_time()
        idle = cProfile.Profile(time.process_time)
        idle.enable()
        await asyncio.sleep(3.0)
        idle.disable()
        out: dict[str, Any] = {"background_ms_per_s": (time.process_time() - cpu) / 3.0 * 1000,
                               "background_profile": _top(idle, top // 2)}
        cpu = time.process_time()
        for _ in range(200):
            await picker.snapshots.refresh_once()
        out["snapshot_refresh_ms"] = (time.process_time() - cpu) / 200 * 1000
        out["handler"] = [await run_decisions(picker, pool, decisions, c) for c in (1, 16)]
        out["stages_ms"] = await stages(picker, pool, decisions // 3)
        profile = cProfile.Profile(time.process_time)
        profile.enable()
        await run_decisions(picker, pool, decisions // 3, 16)
        profile.disable()
        out["profile"] = _top(profile, top)
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await picker.close()
    return out


def with_pods(manifests: Path, pods: int) -> Path:
    """A copy of the manifests whose pods are `pods` copies of their first pod, at 127.1.x.y."""
    out = Path(tempfile.mkdtemp(prefix="decision-profile-manifests-"))
    for path in manifests.glob("*.yaml"):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        first = next((d for d in docs if d["kind"] == "Pod"), None)
        if first is not None:
            copies = []
            for i in range(pods):
                pod = json.loads(json.dumps(first))
                pod["metadata"]["name"] = f"pod-{i}"
                pod["status"]["podIP"] = f"127.1.{i // 250}.{i % 250 + 1}"
                copies.append(pod)
            docs = [d for d in docs if d["kind"] != "Pod"] + copies
        (out / path.name).write_text(yaml.safe_dump_all(docs))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decisions", type=int, default=3000)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--manifests", type=Path, default=Path("examples/fleet"))
    p.add_argument("--picker-args", default="", help="more picker flags, e.g. '--state local'")
    p.add_argument("--pods", type=int, default=0, help="the pool's pods (default: the manifests' own)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="decision-profile-"))
    manifests = with_pods(args.manifests, args.pods) if args.pods else args.manifests
    fleet = Fleet(FleetSettings(manifests_dir=manifests.resolve(), work_dir=work,
                                simulator_args=("--time-scale", "0.01")))
    try:
        fleet.start()
        result = uvloop.run(measure(fleet.redis_url, fleet.first_pool(), args.decisions, args.top,
                                        args.picker_args.split()))
    finally:
        fleet.stop()
    out = Path("bench/out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "decision_profile.json").write_text(json.dumps(result, indent=2))
    for row in result["handler"]:
        print(f"handler, {row['concurrency']:>2} streams: {row['cpu_ms_per_decision']:.3f} ms CPU per decision "
              f"({row['decisions_per_s']:.0f} decisions/s)")
    print(f"background (snapshot refresh, heartbeat), idle: {result['background_ms_per_s']:.1f} ms CPU per second")
    print(f"one snapshot refresh: {result['snapshot_refresh_ms']:.3f} ms CPU")
    print("stages, one at a time (ms CPU per decision):")
    for name, ms in result["stages_ms"].items():
        print(f"  {name:<26} {ms:.3f}")
    print("background, idle:")
    print(result["background_profile"])
    print("decisions at 16 streams:")
    print(result["profile"])


if __name__ == "__main__":
    main()
