"""The picker's Prometheus metrics, in a registry owned by the process's entry point."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Decisions take a millisecond or less; the buckets resolve that and show Redis trouble.
_DECISION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


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
        self.inflight = Gauge("picker_inflight_requests", "Requests this replica routed that are still running.",
                              ["pool"], registry=r)
        self.redis_fallbacks = Counter("picker_redis_fallbacks",
                                       "Request-path Redis calls that failed or missed their deadline.", ["op"],
                                       registry=r)
        self.placement_conflicts = Counter("picker_placement_conflicts",
                                           "Decisions taken again because another replica chose the same endpoint "
                                           "between this one's lookup and admission.", ["pool"], registry=r)
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
        self.redis_up = Gauge("picker_redis_up", "1 when the last snapshot refresh reached Redis.", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
