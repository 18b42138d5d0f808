"""The collector's Prometheus metrics, in a registry owned by its entry point."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

# A scrape of a healthy pod takes milliseconds; a second is the timeout.
_SCRAPE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class GatewayCounters(Collector):
    """The gateways' own ext_proc counters as last read, per pool and gateway instance: they are Envoy's
    (they fall when a gateway restarts, as a counter may), exported under our names for the alerts."""

    def __init__(self) -> None:
        self.readings: dict[tuple[str, str], tuple[int, int]] = {}  # (pool, gateway) -> (requests, bypassed)

    def collect(self) -> Iterator[CounterMetricFamily]:
        requests = CounterMetricFamily(
            "inference_pool_gateway_requests", "Requests a gateway sent to a pool's picker filter (streams opened "
            "plus requests let through without one), from its Envoy's ext_proc counters.", labels=["pool", "gateway"])
        bypassed = CounterMetricFamily(
            "inference_pool_bypassed_requests", "Requests a gateway served without a picker's decision (its "
            "ext_proc failure mode let them through), from its Envoy's counters.", labels=["pool", "gateway"])
        for (pool, gateway), (sent, let_through) in sorted(self.readings.items()):
            requests.add_metric([pool, gateway], sent)
            bypassed.add_metric([pool, gateway], let_through)
        yield requests
        yield bypassed


class CollectorMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.gateways = GatewayCounters()
        r.register(self.gateways)
        self.scrape_seconds = Histogram("collector_scrape_duration_seconds", "Time to scrape one pod's /metrics.",
                                        buckets=_SCRAPE_BUCKETS, registry=r)
        self.scrapes = Counter("collector_scrapes", "Scrapes of pods, by result (ok or failed).", ["result"],
                               registry=r)
        self.failures = Counter("collector_scrape_failures", "Failed scrapes by reason: timeout, connect, "
                                "http_status (not 200), garbled (not the metrics of vLLM or SGLang).", ["reason"],
                                registry=r)
        self.sample_age = Gauge("collector_sample_age_seconds", "Age of the oldest good load sample among the "
                                "endpoints this collector scrapes, per pool.", ["pool"], registry=r)
        self.endpoints_owned = Gauge("collector_endpoints_owned", "Endpoints this collector scrapes.", registry=r)
        self.members = Gauge("collector_members", "Live collectors sharing the scrape work, as this one sees them.",
                             registry=r)
