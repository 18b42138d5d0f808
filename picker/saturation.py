"""When an endpoint, and so a pool, has room: the saturation and release rules.

Pure functions of a load sample and the fleet's requests in flight, shared by
placement (a candidate's room, the pool's saturation), flow control (how many
waiting requests to let through) and the admin API.
"""

from __future__ import annotations

import math

from gateway_state.records import FlowControl, LoadSample


def estimated_waiting(load: LoadSample, inflight: int) -> float:
    """The endpoint's waiting queue now, from the gateway's requests in flight there (every replica's,
    counted the moment they are admitted or end) and the load it had from elsewhere when scraped.

    When scraped, the endpoint held running + waiting requests, `load.gateway_inflight` of them the
    gateway's; the rest came from elsewhere (other clients) and is taken to stay. Each request the
    gateway admitted since adds one and each that ended frees one, so the queue now is in flight +
    from elsewhere - running (negative: batch slots free). A sample 100 ms old would hold a freed slot
    back until the next scrape, and let a burst through before it. A sample that does not say what was
    the gateway's counts none from elsewhere while the gateway has requests there, and is its scraped
    queue alone otherwise."""
    if load.gateway_inflight >= 0:
        elsewhere = load.running + load.waiting - load.gateway_inflight
        elsewhere = elsewhere if elsewhere > 0.0 else 0.0  # not max(): once per candidate per decision
    else:
        elsewhere = 0.0 if inflight > 0 else load.running + load.waiting
    return inflight + elsewhere - load.running


def queue_for_new(load: LoadSample) -> float:
    """How far a new request would be from starting at the endpoint when it was scraped: the requests
    waiting there, and one more where every batch slot is taken (at its batch limit: llama.cpp's slots,
    or the batch a vLLM or SGLang server was last seen full at), for the slot it must wait for."""
    full = load.batch_limit > 0 and load.running + load.waiting >= load.batch_limit
    return load.waiting + 1.0 if full else load.waiting


def has_room(load: LoadSample | None, inflight: int, flow: FlowControl) -> bool:
    """Upstream's saturation rule, per endpoint, on the estimated queue: room unless its queue or its
    KV cache is at the pool's threshold (an endpoint without a fresh sample counts as having room)."""
    return load is None or (estimated_waiting(load, inflight) < flow.saturation_waiting
                            and load.kv_cache_usage < flow.saturation_kv_cache)


def free_slots(load: LoadSample | None, inflight: int, flow: FlowControl, unknown: int) -> int:
    """How many waiting requests may be let through to the endpoint now (the release rule): as many as
    keep its estimated queue at most `release_waiting` once it has been seen full (its batch limit, or
    queueing or its KV cache at the saturation threshold when scraped); `unknown` without a sample."""
    if load is None:
        return unknown
    queue = estimated_waiting(load, inflight)
    if load.batch_limit > 0:  # the batch it was last seen full at: what it runs without queueing
        # Its load now: the gateway's requests there, and what it had from elsewhere.
        return max(0, math.ceil(load.batch_limit + flow.release_waiting - (load.running + queue)))
    if load.waiting <= 0 and load.kv_cache_usage < flow.saturation_kv_cache:
        # Never seen full: it could start more than it was running, how many more is unknown. It
        # grows by up to the saturation queue per sample, as new arrivals do.
        return max(0, math.ceil(flow.saturation_waiting - queue))
    return max(0, math.ceil(flow.release_waiting - queue))
