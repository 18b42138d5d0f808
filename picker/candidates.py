"""From the shared view to what the scheduler weighs: one Candidate per endpoint of the pool.

Pure: the view (the fleet's requests in flight, the prefix blocks each endpoint
holds, the prefill backlog) was read before, in the decision's one round trip.
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway_state.placement_store import SharedView, model_field, prefill_left
from gateway_state.records import LoadSample, Pool
from picker.plugins.framework import Candidate
from picker.saturation import has_room
from picker.settings import PickerSettings


def fresh(sample: LoadSample | None, now_ms: int, max_age_ms: int) -> LoadSample | None:
    """The sample if it is good and young enough to score by; None: the load is unknown."""
    if sample is None or not sample.ok or now_ms - sample.scraped_at_ms > max_age_ms:
        return None
    return sample


def build_candidates(pool: Pool, samples: Mapping[str, LoadSample], speeds: Mapping[str, float], view: SharedView,
                     drained: frozenset[str], model: str, now_ms: int, settings: PickerSettings) -> list[Candidate]:
    """`speeds`: the endpoints' prefill speeds, `prefill_speeds` of the same pool and samples."""
    max_age_ms, flow, models = settings.state.max_sample_age_ms, pool.flow, view.inflight_models
    inflight_at, matched_at = view.inflight.get, view.matched_blocks.get
    out = []
    for e in pool.endpoints:  # once per endpoint per decision: kept lean for pools of hundreds
        key = e.key
        sample = samples.get(key)
        load, inflight, speed = fresh(sample, now_ms, max_age_ms), inflight_at(key, 0), speeds[key]
        out.append(Candidate(e, load, sample.consecutive_failures if sample else 0, inflight, matched_at(key, 0),
                             pending_prefill(view, key, speed), key in drained,
                             models.get(model_field(key, model), 0) if models else 0,
                             has_room(load, inflight, flow), speed))
    return out


def prefill_speeds(pool: Pool, samples: Mapping[str, LoadSample], tokens_per_block: float,
                   prior_tokens_per_s: float) -> dict[str, float]:
    """Per endpoint, the uncached prompt blocks per second it computes, as its collector measured them
    (LoadSample.prefill_tokens_per_s). One not measured yet takes the slowest measured speed of its pool,
    whose servers are alike, or the prior while none is measured (0: unknown)."""
    measured = {e.key: samples[e.key].prefill_tokens_per_s / tokens_per_block for e in pool.endpoints
                if e.key in samples and samples[e.key].prefill_tokens_per_s > 0}
    slowest = min(measured.values(), default=prior_tokens_per_s / tokens_per_block)
    return {e.key: measured.get(e.key, slowest) for e in pool.endpoints}


def pending_prefill(view: SharedView, endpoint: str, blocks_per_s: float) -> float:
    """The uncached prompt blocks `endpoint` has still to compute: those of the requests in flight there,
    less what it computed since they came at its speed (the backlog ADMIT recorded, drained since). At an
    unknown speed, or with no backlog recorded, all of the requests' blocks in flight. A request's blocks
    stay in flight until it ends, long after its prefill, so the in-flight figure alone overstates. The
    reader's own admissions that the recorded backlog does not hold yet add to it undrained."""
    work = float(view.inflight_work.get(endpoint, 0))
    recorded = view.prefill_backlog.get(endpoint)
    left = prefill_left(recorded[0], recorded[1], blocks_per_s) if recorded else None
    return work if left is None else min(work, left + view.unrecorded_work.get(endpoint, 0))
