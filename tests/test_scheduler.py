"""Scheduling plugins and the runner, as pure functions of a snapshot."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from gateway_state.records import Criticality, Endpoint, LoadSample, Strategy
from picker.errors import Shed
from picker.plugins.framework import Candidate, SchedulingRequest
from picker.plugins.scorers import PrefixHomeScorer
from picker.prefix import block_hashes, prompt_text
from picker.scheduler import Scheduler, build_profiles
from picker.settings import SchedulingSettings


def candidate(i: int, waiting: float = 0, kv: float = 0.1, inflight: int = 0, matched: int = 0,
              failures: int = 0, known: bool = True) -> Candidate:
    load = LoadSample(0, True, waiting=waiting, kv_cache_usage=kv) if known else None
    return Candidate(Endpoint(f"pod-{i}", f"10.0.0.{i}", 8000), load, failures, inflight, matched)


@pytest.fixture
def scheduler() -> Scheduler:
    return Scheduler(build_profiles(SchedulingSettings(), random.Random(7)))


def req(blocks: int = 0, criticality: Criticality = Criticality.STANDARD) -> SchedulingRequest:
    return SchedulingRequest("m", criticality, blocks)


def test_default_avoids_queues_and_full_caches(scheduler: Scheduler) -> None:
    pods = [candidate(0, waiting=12), candidate(1, kv=0.95), candidate(2), candidate(3, inflight=40)]
    picks = Counter(scheduler.schedule(Strategy.DEFAULT, req(), pods).endpoints[0].endpoint.name for _ in range(50))
    assert picks == {"pod-2": 50}


def test_equal_endpoints_share_the_load(scheduler: Scheduler) -> None:
    pods = [candidate(i) for i in range(4)]
    picks = Counter(scheduler.schedule(Strategy.DEFAULT, req(), pods).endpoints[0].endpoint.name for _ in range(400))
    assert len(picks) == 4 and min(picks.values()) > 60


def test_prefix_affinity_holds_under_small_load_differences(scheduler: Scheduler) -> None:
    pods = [candidate(0, matched=8, inflight=3, waiting=1), candidate(1), candidate(2)]
    assert scheduler.schedule(Strategy.PREFIX_CACHE, req(10), pods).endpoints[0].endpoint.name == "pod-0"


def test_a_hot_prefix_spills_once_its_holder_is_overloaded(scheduler: Scheduler) -> None:
    pods = [candidate(0, matched=10, inflight=30, waiting=8, kv=0.7), candidate(1, inflight=2), candidate(2)]
    assert scheduler.schedule(Strategy.PREFIX_CACHE, req(10), pods).endpoints[0].endpoint.name != "pod-0"


def test_fallbacks_follow_the_chosen_endpoint_in_score_order(scheduler: Scheduler) -> None:
    pods = [candidate(0, waiting=4), candidate(1), candidate(2, waiting=2), candidate(3, waiting=9)]
    order = [c.endpoint.name for c in scheduler.schedule(Strategy.DEFAULT, req(), pods).endpoints]
    assert order == ["pod-1", "pod-2", "pod-0"]


def test_sheddable_requests_are_shed_only_when_every_endpoint_is_saturated(scheduler: Scheduler) -> None:
    saturated = [candidate(0, waiting=6), candidate(1, kv=0.9)]
    with pytest.raises(Shed):
        scheduler.schedule(Strategy.DEFAULT, req(criticality=Criticality.SHEDDABLE), saturated)
    assert scheduler.schedule(Strategy.DEFAULT, req(criticality=Criticality.CRITICAL), saturated).endpoints
    mixed = [*saturated, candidate(2, waiting=1)]
    chosen = scheduler.schedule(Strategy.DEFAULT, req(criticality=Criticality.SHEDDABLE), mixed).endpoints
    assert [c.endpoint.name for c in chosen] == ["pod-2"]


def test_failing_endpoints_leave_unless_all_fail(scheduler: Scheduler) -> None:
    pods = [candidate(0, failures=5, known=False), candidate(1, waiting=3)]
    assert [c.endpoint.name for c in scheduler.schedule(Strategy.DEFAULT, req(), pods).endpoints] == ["pod-1"]
    all_failing = [candidate(0, failures=5, known=False), candidate(1, failures=3, known=False)]
    assert len(scheduler.schedule(Strategy.DEFAULT, req(), all_failing).endpoints) == 2


def test_prefix_hashes_chain_and_are_seeded_per_model_and_deployment() -> None:
    turn1 = {"messages": [{"role": "user", "content": "x" * 200}]}
    turn2 = {"messages": [*turn1["messages"], {"role": "assistant", "content": "y" * 100}]}
    h1 = block_hashes(prompt_text(turn1), "m", 1, 64, 256)
    h2 = block_hashes(prompt_text(turn2), "m", 1, 64, 256)
    assert len(h1) == 3 and h2[:3] == h1 and len(h2) == 4
    assert block_hashes(prompt_text(turn1), "other", 1, 64, 256)[0] != h1[0]
    assert block_hashes(prompt_text(turn1), "m", 2, 64, 256)[0] != h1[0]
    assert len(block_hashes("z" * 64 * 300, "m", 1, 64, 256)) == 256
    assert prompt_text({"prompt": "abc"}) == "abc" and prompt_text({}) == ""


def test_a_new_prefix_has_one_home_whatever_the_candidate_order() -> None:
    scorer, pods = PrefixHomeScorer(), [candidate(i) for i in range(6)]
    homes = set()
    for shift in range(6):
        order = pods[shift:] + pods[:shift]
        scores = scorer.score(SchedulingRequest("m", Criticality.STANDARD, 4, "abc"), order)
        homes.add(order[scores.index(1.0)].endpoint.name)
    assert len(homes) == 1
    others = {pods[scorer.score(SchedulingRequest("m", Criticality.STANDARD, 4, f"p{i}"), pods).index(1.0)]
              .endpoint.name for i in range(60)}
    assert len(others) == 6  # different prefixes spread over every endpoint
    held = [candidate(0, matched=2), *pods[1:]]
    assert scorer.score(SchedulingRequest("m", Criticality.STANDARD, 4, "abc"), held) == [0.0] * 6


def test_scheduling_overrides_take_each_fields_type_and_refuse_unknown_names() -> None:
    s = SchedulingSettings.from_overrides(["inflight_scale=4", "fallbacks=3"])
    assert (s.inflight_scale, s.fallbacks, s.queue_scale) == (4.0, 3, SchedulingSettings().queue_scale)
    assert isinstance(s.fallbacks, int)
    for bad in ("inflight_scale", "no_such=1", "fallbacks=two"):
        with pytest.raises(ValueError, match="--scheduling"):
            SchedulingSettings.from_overrides([bad])
