"""The collector's Prometheus metrics, in a registry owned by its entry point."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# A scrape of a healthy pod takes milliseconds; a second is the timeout.
_SCRAPE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class CollectorMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
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
