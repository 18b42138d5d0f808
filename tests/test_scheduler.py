"""Scheduling plugins and the runner, as pure functions of a snapshot."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest

from gateway_state.records import Endpoint, FlowControl, LoadSample, Strategy
from picker.errors import Shed
from picker.plugins.framework import Candidate, SchedulingRequest
from picker.plugins.scorers import PrefixHomeScorer
from picker.saturation import has_room
from picker.scheduler import Scheduler, build_profiles
from picker.settings import SchedulingSettings


def candidate(i: int, waiting: float = 0, kv: float = 0.1, inflight: int = 0, matched: int = 0,
              failures: int = 0, known: bool = True, work: int = 0) -> Candidate:
    load = LoadSample(0, True, waiting=waiting, kv_cache_usage=kv) if known else None
    return Candidate(Endpoint(f"pod-{i}", f"10.0.0.{i}", 8000), load, failures, inflight, matched, work,
                     room=has_room(load, inflight, FlowControl()))


@pytest.fixture
def scheduler() -> Scheduler:
    return Scheduler(build_profiles(SchedulingSettings(), random.Random(7)))


def req(blocks: int = 0, priority: int = 0) -> SchedulingRequest:
    return SchedulingRequest("m", priority, blocks, work_blocks=blocks)


def test_default_avoids_queues_and_full_caches(scheduler: Scheduler) -> None:
    pods = [candidate(0, waiting=12), candidate(1, kv=0.95), candidate(2), candidate(3, inflight=40)]
    picks = Counter(scheduler.schedule(Strategy.DEFAULT, req(), pods).endpoints[0].endpoint.name for _ in range(50))
    assert picks == {"pod-2": 50}


def test_a_pod_with_every_batch_slot_taken_loses_a_new_prompt_to_one_with_a_free_slot(scheduler: Scheduler) -> None:
    """Busy slots taken by clients other than the gateway (no in-flight count shows them): a llama.cpp pod
    at its slot count, nobody deferred yet, against an idle one. The new request would wait for a slot."""
    full = replace(candidate(0), load=LoadSample(0, True, running=4, batch_limit=4, kv_cache_usage=0.1))
    free = replace(candidate(1), load=LoadSample(0, True, running=3, batch_limit=4, kv_cache_usage=0.1))
    for strategy in (Strategy.DEFAULT, Strategy.PREFIX_CACHE):
        picks = Counter(scheduler.schedule(strategy, req(), [full, free]).endpoints[0].endpoint.name
                        for _ in range(50))
        assert picks == {"pod-1": 50}


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


def test_a_long_cold_prompt_avoids_endpoints_already_prefilling_one(scheduler: Scheduler) -> None:
    """Same request counts everywhere, but two endpoints have a cold 4k-token prompt under way."""
    pods = [candidate(0, inflight=2, work=256), candidate(1, inflight=2, work=12), candidate(2, inflight=2, work=240)]
    for strategy in (Strategy.DEFAULT, Strategy.PREFIX_CACHE):
        picks = {scheduler.schedule(strategy, req(200), pods).endpoints[0].endpoint.name for _ in range(30)}
        assert picks == {"pod-1"}


def test_a_cached_follow_up_stays_with_its_prefix_beside_one_cold_prefill(scheduler: Scheduler) -> None:
    pods = [candidate(0, matched=190, inflight=2, work=256), candidate(1), candidate(2)]
    assert scheduler.schedule(Strategy.PREFIX_CACHE, req(200), pods).endpoints[0].endpoint.name == "pod-0"


def test_a_cold_prompt_goes_where_its_prefill_waits_least_even_with_more_requests_there(
        scheduler: Scheduler) -> None:
    pods = [candidate(0, inflight=1, work=250), candidate(1, inflight=3, work=15)]
    assert scheduler.schedule(Strategy.DEFAULT, req(200), pods).endpoints[0].endpoint.name == "pod-1"


def test_a_prompt_nobody_holds_goes_where_the_prefill_ahead_ends_first_over_its_prefix_home(
        scheduler: Scheduler) -> None:
    """A third of a cold prompt still to compute at its home weighs more than the home: nothing is cached
    anywhere, so only the wait differs. A prompt with its prefix there stays (the same backlog there)."""
    for i in range(20):
        cold = SchedulingRequest("m", 0, 200, first_block=f"prompt-{i}", work_blocks=200)
        pods = [candidate(n, inflight=1, work=100) for n in range(4)]
        home = pods[[round(s) for s in PrefixHomeScorer().score(cold, pods)].index(1)]
        pods = [replace(p, pending_prefill=0.0) if p is not home else p for p in pods]
        assert scheduler.schedule(Strategy.PREFIX_CACHE, cold, pods).endpoints[0].endpoint != home.endpoint
        pods = [replace(p, matched_blocks=150) if p is home else p for p in pods]
        assert scheduler.schedule(Strategy.PREFIX_CACHE, cold, pods).endpoints[0].endpoint == home.endpoint


def test_ties_go_at_random_and_a_clearly_better_endpoint_wins(scheduler: Scheduler) -> None:
    pods = [candidate(i) for i in range(4)]
    picks = Counter(scheduler.schedule(Strategy.DEFAULT, req(), pods).endpoints[0].endpoint.name for _ in range(100))
    assert set(picks) == {"pod-0", "pod-1", "pod-2", "pod-3"} and min(picks.values()) > 10
    pods[0] = candidate(0, inflight=0, kv=0.0)
    pods[1:] = [candidate(i, inflight=6) for i in range(1, 4)]
    assert scheduler.schedule(Strategy.DEFAULT, req(), pods).endpoints[0].endpoint.name == "pod-0"


def test_an_endpoint_with_a_backlog_gets_nothing_while_another_has_none(scheduler: Scheduler) -> None:
    """Whatever else favours it: its whole prefix cached, and nothing in flight from the pickers."""
    pods = [candidate(0, waiting=6, matched=10), candidate(1, inflight=12, work=200), candidate(2, inflight=14)]
    for strategy in (Strategy.DEFAULT, Strategy.PREFIX_CACHE):
        assert {scheduler.schedule(strategy, req(10), pods).endpoints[0].endpoint.name for _ in range(30)} <= {
            "pod-1", "pod-2"}
    # Every endpoint backlogged: the guard keeps them all, and scores decide.
    pods = [candidate(0, waiting=6, matched=10), candidate(1, waiting=9)]
    assert scheduler.schedule(Strategy.PREFIX_CACHE, req(10), pods).endpoints[0].endpoint.name == "pod-0"


def test_fallbacks_follow_the_chosen_endpoint_in_score_order(scheduler: Scheduler) -> None:
    pods = [candidate(0, waiting=4), candidate(1), candidate(2, waiting=2), candidate(3, waiting=9)]
    order = [c.endpoint.name for c in scheduler.schedule(Strategy.DEFAULT, req(), pods).endpoints]
    assert order == ["pod-1", "pod-2", "pod-0"]


def test_in_a_large_pool_the_fallbacks_are_the_best_of_the_rest_with_ties_shared(scheduler: Scheduler) -> None:
    """256 endpoints, four queue lengths: the fallbacks come from the best of the rest, and ties among them
    go to different endpoints from one decision to the next."""
    pods = [candidate(i, waiting=i % 4) for i in range(256)]
    fallbacks: Counter[str] = Counter()
    for _ in range(200):
        chosen, *rest = scheduler.schedule(Strategy.DEFAULT, req(), pods).endpoints
        assert chosen.load is not None and chosen.load.waiting == 0
        assert len(rest) == 2 and all(c.load is not None and c.load.waiting == 0 for c in rest)
        assert chosen not in rest
        fallbacks.update(c.endpoint.name for c in rest)
    assert len(fallbacks) > 32  # the 64 tied endpoints share the fallback places


def test_sheddable_requests_are_shed_only_when_every_endpoint_is_saturated(scheduler: Scheduler) -> None:
    saturated = [candidate(0, waiting=6), candidate(1, kv=0.9)]
    with pytest.raises(Shed):
        scheduler.schedule(Strategy.DEFAULT, req(priority=-1), saturated)
    assert scheduler.schedule(Strategy.DEFAULT, req(priority=1), saturated).endpoints
    mixed = [*saturated, candidate(2, waiting=1)]
    chosen = scheduler.schedule(Strategy.DEFAULT, req(priority=-1), mixed).endpoints
    assert [c.endpoint.name for c in chosen] == ["pod-2"]


def test_failing_endpoints_leave_unless_all_fail(scheduler: Scheduler) -> None:
    pods = [candidate(0, failures=5, known=False), candidate(1, waiting=3)]
    assert [c.endpoint.name for c in scheduler.schedule(Strategy.DEFAULT, req(), pods).endpoints] == ["pod-1"]
    all_failing = [candidate(0, failures=5, known=False), candidate(1, failures=3, known=False)]
    assert len(scheduler.schedule(Strategy.DEFAULT, req(), all_failing).endpoints) == 2


def test_a_new_prefix_has_one_home_whatever_the_candidate_order() -> None:
    scorer, pods = PrefixHomeScorer(), [candidate(i) for i in range(6)]
    homes = set()
    for shift in range(6):
        order = pods[shift:] + pods[:shift]
        scores = scorer.score(SchedulingRequest("m", 0, 4, "abc"), order)
        homes.add(order[scores.index(1.0)].endpoint.name)
    assert len(homes) == 1
    others = {pods[scorer.score(SchedulingRequest("m", 0, 4, f"p{i}"), pods).index(1.0)]
              .endpoint.name for i in range(60)}
    assert len(others) == 6  # different prefixes spread over every endpoint
    held = [candidate(0, matched=2), *pods[1:]]
    assert scorer.score(SchedulingRequest("m", 0, 4, "abc"), held) == [0.0] * 6


def test_scheduling_overrides_take_each_fields_type_and_refuse_unknown_names() -> None:
    s = SchedulingSettings.from_overrides(["inflight_scale=4", "fallbacks=3"])
    assert (s.inflight_scale, s.fallbacks, s.queue_scale) == (4.0, 3, SchedulingSettings().queue_scale)
    assert isinstance(s.fallbacks, int)
    for bad in ("inflight_scale", "no_such=1", "fallbacks=two"):
        with pytest.raises(ValueError, match="--scheduling"):
            SchedulingSettings.from_overrides([bad])
