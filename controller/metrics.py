"""The controller's Prometheus metrics, in a registry owned by its entry point."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class ControllerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.reconciles = Counter("controller_reconciles", "Reconcile passes, by result: ok, invalid (some object "
                                  "could not be used), no_source (nothing loaded yet), redis_error.", ["result"],
                                  registry=r)
        self.invalid_resources = Gauge("controller_invalid_resources", "Objects the controller cannot use now "
                                       "(their last good version, if any, keeps serving).", registry=r)
        self.leader = Gauge("controller_is_leader", "1 while this replica leads and publishes.", registry=r)
        self.generation = Gauge("controller_config_generation", "The config generation in Redis, as this replica "
                                "last wrote or read it.", registry=r)
        self.watch_restarts = Counter("controller_watch_restarts", "Watches of the API server opened again, by "
                                      "resource and reason: gone (410, listed again), error, disconnected.",
                                      ["resource", "reason"], registry=r)
