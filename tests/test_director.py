"""The director's one sequence: `/admin/explain` (Director.explain) and the real decision (Director.decide)
agree for requests with a gateway's subset hint, a route's mirror, an objective and a tenant, flow control's
verdict included; and the end of a request lets a waiting one through without any callback between objects.

One replica over its own memory (no Redis): the loads are distinct, so no tie leaves the pick to chance.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import random
import re

import pytest
from redis.asyncio import Redis

from gateway_state.clock import FleetClock
from gateway_state.lifecycle import LINE_FORMAT
from gateway_state.records import (
    Config,
    Criticality,
    Endpoint,
    FlowControl,
    LoadSample,
    Model,
    Objective,
    Pool,
    TargetModel,
)
from gateway_state.store import StateStore
from picker.director import Arrival, Director
from picker.errors import Shed
from picker.flow_control import FlowController
from picker.hit_counts import HitCounts
from picker.intake import Intake
from picker.metrics import PickerMetrics
from picker.placement import Placement
from picker.roles import Mirror, ProfileHandler, Role
from picker.scheduler import Scheduler, build_profiles
from picker.settings import PickerSettings, ServerSettings
from picker.snapshot import Snapshot, SnapshotSource
from picker.state import MemoryState
from picker.state_guard import StateGuard
from picker.writes import WriteBatcher
from tests.conftest import free_port

PODS = tuple(Endpoint(f"pod-{i}", f"10.0.0.{i}", 8000) for i in range(4))
MIRRORS = tuple(Endpoint(f"mirror-{i}", f"10.0.1.{i}", 8000) for i in range(2))


def make(waiting: tuple[float, ...] = (0, 1, 2, 3), saturation_waiting: float = 5.0) -> Director:
    settings = PickerSettings(server=ServerSettings(replica_id="me"))
    pools = {"ns/p": Pool("ns/p", (8000,), endpoints=PODS, flow=FlowControl(saturation_waiting=saturation_waiting)),
             "ns/m": Pool("ns/m", (8000,), endpoints=MIRRORS)}
    model = Model("m", "ns/p", Criticality.STANDARD, (TargetModel("m", 1),))
    config = Config(1, pools, {"ns/p": {"m": model}, "ns/m": {}},
                    objectives={"ns/p": {"batch": Objective("batch", "ns/p", -1)}})
    clock, metrics, rng = FleetClock(), PickerMetrics(), random.Random(3)
    now = clock.now_ms()
    # gateway_inflight 0: all the load was there before this replica placed anything (it stays).
    load = {"ns/p": {e.key: LoadSample(now, True, waiting=w, running=4, gateway_inflight=0)
                     for e, w in zip(PODS, waiting, strict=True)},
            "ns/m": {MIRRORS[0].key: LoadSample(now, True, waiting=3, running=4),
                     MIRRORS[1].key: LoadSample(now, True, running=1)}}
    snapshots = SnapshotSource(StateStore(Redis(port=free_port())), settings.state, clock)
    snapshots.current = Snapshot(config, load)
    state, guard = MemoryState(), StateGuard(metrics, 50, 250)
    placement = Placement(state, None, Scheduler(build_profiles(settings.scheduling, rng)), settings, metrics,
                          clock, guard, WriteBatcher(state, None, guard))
    flow = FlowController(None, placement, snapshots, settings, metrics, StateGuard(metrics, 50, 250, "queue-"))
    return Director(snapshots, Intake(settings.prefix, 1 << 20, rng), ProfileHandler(rng), flow, placement, metrics,
                    HitCounts())


def arrival(text: str = "hello", **kwargs: object) -> Arrival:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}).encode()
    return Arrival("ns/p", "/v1/chat/completions", body, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["plain", "subset", "mirror", "objective", "tenant"])
async def test_explain_names_what_the_decision_does(kind: str) -> None:
    given = {"plain": {}, "subset": {"subset": frozenset({PODS[2].key, PODS[3].key})},
             "mirror": {"mirror": Mirror("ns/m")}, "objective": {"objective": "batch"},
             "tenant": {"tenant": "team-a"}}[kind]
    # Sheddable (the objective's priority -1) goes only where there is room: pod-0 is saturated.
    director = make((5, 1, 2, 3) if kind == "objective" else (0, 1, 2, 3))
    explained = await director.explain(arrival(**given))
    answer = await director.decide(arrival(**given))
    picks = {role.role: plan.chosen.endpoint.key for role, plan, _ in explained.plans}
    assert picks == {role: placed.chosen.endpoint.key for role, placed in answer.placements.placed.items()}
    assert explained.flow == "placed"
    expected = {"plain": PODS[0], "subset": PODS[2], "mirror": PODS[0], "objective": PODS[1], "tenant": PODS[0]}[kind]
    assert picks[Role.PRIMARY] == expected.key
    if kind == "mirror":
        assert picks[Role.MIRROR] == MIRRORS[1].key  # the mirror pool's own strategy and load
    assert (explained.request.priority, explained.request.tenant) == \
        ({"objective": -1}.get(kind, 0), {"tenant": "team-a"}.get(kind, ""))
    director.finish(answer)


async def test_explain_says_when_flow_control_would_queue_or_shed_and_the_decision_does() -> None:
    director = make((6, 6, 6, 6))  # every pod saturated
    for step in (director.explain, director.decide):  # Sheddable: refused (429), explained as refused
        with pytest.raises(Shed):
            await step(arrival(objective="batch"))
    assert (await director.explain(arrival(tenant="team-a"))).flow == "queued"
    waiting = asyncio.create_task(director.decide(arrival(tenant="team-a")))
    await asyncio.sleep(0.1)
    assert not waiting.done()  # queued, as explained
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_a_request_that_ends_lets_a_waiting_one_through() -> None:
    """The director tells flow control when a request ends; nothing installs a callback on placement."""
    director = make((0, 0, 0, 0), saturation_waiting=1)  # one request in flight saturates a pod
    first = [await director.decide(arrival(f"first {i}")) for i in range(4)]
    waiting = asyncio.create_task(director.decide(arrival("second")))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    director.finish(first[0])
    answer = await asyncio.wait_for(waiting, 2.0)
    assert answer.placements.primary.chosen.endpoint.key == first[0].placements.primary.chosen.endpoint.key


async def test_the_decision_line_reads_as_every_other_log_line_and_follows_the_level() -> None:
    """The line per decision bypasses the logging module's machinery (`LineLog`), yet goes to the same stream
    in the same format as the process's other lines, and the picker logger's level still silences it."""
    root, picker_log, stream = logging.getLogger(), logging.getLogger("picker"), io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(LINE_FORMAT))
    saved_handlers, saved_level = root.handlers[:], picker_log.level
    root.handlers[:] = [handler]
    try:
        picker_log.setLevel(logging.INFO)
        director = make()
        director.finish(await director.decide(arrival(request_id="r-1")))
        picker_log.info("an ordinary line")
        decision, ordinary = stream.getvalue().splitlines()
        shape = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO picker "
        assert re.fullmatch(shape + r"Request Handled request_id=r-1 .* pod=pod-0 endpoint=10\.0\.0\.0:8000 .*",
                            decision)
        assert re.fullmatch(shape + "an ordinary line", ordinary)
        picker_log.setLevel(logging.WARNING)
        director.finish(await director.decide(arrival(request_id="r-2")))
        assert "r-2" not in stream.getvalue()
    finally:
        root.handlers[:] = saved_handlers
        picker_log.setLevel(saved_level)
