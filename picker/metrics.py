"""The picker's Prometheus metrics, in a registry owned by the process's entry point."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:  # the snapshot module imports these metrics
    from picker.snapshot import Snapshot

# Decisions take a millisecond or less; the buckets resolve that and show Redis trouble.
_DECISION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
# Waits in flow control's queue: from a few milliseconds to the longest time-to-live.
_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class PickerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("picker_requests", "Requests handled, by model, pool, chosen endpoint and result.",
                                ["model", "pool", "endpoint", "result"], registry=r)
        self.decision_seconds = Histogram("picker_decision_seconds",
                                          "Time from the request body to the routing decision.",
                                          ["pool", "strategy"], buckets=_DECISION_BUCKETS, registry=r)
        self.prefix_blocks_queried = Counter("picker_prefix_blocks_queried",
                                             "Prompt prefix blocks looked up in the shared index.", ["pool"],
                                             registry=r)
        self.prefix_blocks_matched = Counter("picker_prefix_blocks_matched",
                                             "Prompt prefix blocks the chosen endpoint already held.", ["pool"],
                                             registry=r)
        self.prompt_untokenized = Counter("picker_prompt_untokenized", "Requests to a pool indexed from engine "
                                          "events whose token ids could not be known (no tokenizer for the model, "
                                          "a part it cannot take): placed by load alone.", ["pool"], registry=r)
        self.inflight = Gauge("picker_inflight_requests", "Requests this replica routed that are still running.",
                              ["pool"], registry=r)
        self.redis_call_seconds = Histogram("picker_redis_call_seconds",
                                            "Redis calls the picker waited for, by operation (`lookup` and `admit` "
                                            "on the request path), answered or not: the round trip as the event "
                                            "loop saw it.", ["op"], buckets=_DECISION_BUCKETS, registry=r)
        self.redis_fallbacks = Counter("picker_redis_fallbacks",
                                       "Request-path Redis calls that failed or missed their deadline.", ["op"],
                                       registry=r)
        self.placement_conflicts = Counter("picker_placement_conflicts",
                                           "Decisions taken again because another replica chose the same endpoint "
                                           "between this one's lookup and admission.", ["pool"], registry=r)
        self.placement_switches = Counter("picker_placement_switches",
                                          "Admissions that took another of the decision's endpoints than its "
                                          "choice, re-weighed on the pool's figures of that instant.",
                                          ["pool"], registry=r)
        self.late_admissions = Counter("picker_late_admissions",
                                       "Admissions answered past their deadline, by what the answer meant when it "
                                       "came: as_sent (counted where the request went), moved (counted at another "
                                       "option, moved there), added (counted nowhere, added), ended (the request "
                                       "had ended: released), lost (never answered: the heartbeat heals it).",
                                       ["pool", "outcome"], registry=r)
        self.snapshot_refreshes = Counter("picker_snapshot_refreshes",
                                          "Snapshots of config and load read from Redis (every 50 ms).",
                                          registry=r)
        self.internal_errors = Counter("picker_internal_errors",
                                       "Requests answered 500 because the picker itself failed (see its log).",
                                       registry=r)
        self.served_endpoints = Counter("picker_served_endpoints",
                                        "Requests whose gateway reported the endpoint that served them: the "
                                        "picked one, a fallback of the picker's list, or another.",
                                        ["pool", "outcome"], registry=r)
        self.mirrors = Counter("picker_mirrors", "Copies for a route's InferencePool mirror, by mirror pool: "
                               "`mirrored`, or `dropped` (the mirror pool saturated or without endpoints; never "
                               "queued).", ["pool", "outcome"], registry=r)
        self.flow_waiting = Gauge("picker_flow_queue_waiting_requests", "Requests of this replica waiting in "
                                  "flow control's queue for room, by pool and priority (sum over replicas: the "
                                  "fleet's queue).", ["pool", "priority"], registry=r)
        self.flow_requests = Counter("picker_flow_requests", "Requests that met a saturated pool, by outcome: "
                                     "`dispatched` (waited, then routed), `shed` (negative priority: 429 at once), "
                                     "`rejected` (queue full: 429), `expired` (past its time-to-live: 503), "
                                     "`cancelled` (the client went away), `failed` (routing failed after the wait).",
                                     ["pool", "priority", "outcome"], registry=r)
        self.flow_wait_seconds = Histogram("picker_flow_queue_wait_seconds", "Time requests waited in flow "
                                           "control's queue, by outcome.", ["pool", "priority", "outcome"],
                                           buckets=_WAIT_BUCKETS, registry=r)
        self.flow_dropped = Counter("picker_flow_queue_dropped", "Queue entries dropped when they surfaced: past "
                                    "their deadline, or owned by a replica that died.", ["pool"], registry=r)
        self.redis_up = Gauge("picker_redis_up", "1 when the last snapshot refresh reached Redis.", registry=r)
        self.config_generation = Gauge("picker_config_generation", "The config generation this replica routes by.",
                                       registry=r)
        self.drained = Gauge("picker_drained_endpoints", "Endpoints an operator drained, per pool.", ["pool"],
                             registry=r)
        self.endpoint_kv = Gauge("picker_endpoint_kv_cache_usage", "KV-cache use (0..1) of each endpoint, from its "
                                 "last good load sample.", ["pool", "endpoint"], registry=r)
        self.endpoint_inflight = Gauge("picker_endpoint_inflight_requests", "Requests this replica has in flight at "
                                       "each endpoint.", ["pool", "endpoint"], registry=r)
        # The upstream endpoint picker's names and labels, so dashboards built for it work here.
        self.pool_kv = Gauge("inference_pool_average_kv_cache_utilization", "Mean KV-cache use of the pool's "
                             "endpoints with a good load sample.", ["name"], registry=r)
        self.pool_queue = Gauge("inference_pool_average_queue_size", "Mean waiting requests per endpoint of the "
                                "pool.", ["name"], registry=r)
        self.pool_pod_queue = Gauge("inference_pool_per_pod_queue_size", "Waiting requests of each endpoint.",
                                    ["name", "model_server_pod"], registry=r)
        self.pool_ready = Gauge("inference_pool_ready_pods", "Endpoints the pool routes to.", ["name"], registry=r)
        self.objective_requests = Counter("inference_objective_request", "Requests routed, by the model the client "
                                          "named (when the pool lists it; otherwise `(unlisted)`) and the model "
                                          "served.", ["model_name", "target_model_name"], registry=r)

        # (metric, label values) -> the labelled child: prometheus_client's own lookup validates and converts
        # the values on every call, a tenth of the request path's metric cost; decisions ask again and again.
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}

    def of(self, metric: Counter | Gauge | Histogram, *values: str) -> Any:
        """The metric's child for these label values (kept: the label sets are bounded, as the metric's own)."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def observe_snapshot(self, snapshot: Snapshot, own: Mapping[str, Mapping[str, int]]) -> None:
        """Set the gauges that describe the fleet as this replica sees it; called when scraped."""
        config = snapshot.config
        if config is None:
            return
        self.config_generation.set(config.generation)
        for pool in config.pools.values():
            samples = snapshot.load.get(pool.name, {})
            good = [s for s in (samples.get(e.key) for e in pool.endpoints) if s is not None and s.ok]
            self.pool_ready.labels(pool.name).set(len(pool.endpoints))
            self.pool_kv.labels(pool.name).set(sum(s.kv_cache_usage for s in good) / len(good) if good else 0)
            self.pool_queue.labels(pool.name).set(sum(s.waiting for s in good) / len(good) if good else 0)
            self.drained.labels(pool.name).set(len(snapshot.drained.get(pool.name, ())))
            for e in pool.endpoints:
                sample = samples.get(e.key)
                self.pool_pod_queue.labels(pool.name, e.name).set(sample.waiting if sample else 0)
                self.endpoint_kv.labels(pool.name, e.key).set(sample.kv_cache_usage if sample else 0)
                self.endpoint_inflight.labels(pool.name, e.key).set(own.get(pool.name, {}).get(e.key, 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
