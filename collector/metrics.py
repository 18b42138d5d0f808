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
        # KV-cache events (pools whose prefix index comes from the engines), per endpoint this collector owns.
        kv = ["pool", "endpoint"]
        self.kv_streams = Gauge("collector_kv_streams", "KV-event streams this collector follows.", registry=r)
        self.kv_live = Gauge("collector_kv_stream_live", "1 while the endpoint's KV-event stream is live; 0 while "
                             "connecting, or silent (the engine computes prompts and no event arrives).", kv,
                             registry=r)
        self.kv_silent = Gauge("collector_kv_stream_silent", "1 while the endpoint's engine computes prompts and its "
                               "KV events do not arrive (the pickers keep their placements there meanwhile).", kv,
                               registry=r)
        self.kv_sequence = Gauge("collector_kv_stream_sequence", "The last batch of the endpoint's KV events applied.",
                                 kv, registry=r)
        self.kv_lag = Gauge("collector_kv_stream_lag_seconds", "From the engine's timestamp of the last batch to its "
                            "being applied to the index.", kv, registry=r)
        self.kv_blocks = Gauge("collector_kv_stream_blocks", "The endpoint's blocks in the prefix index, as its "
                               "engine reported them.", kv, registry=r)
        self.kv_batches = Counter("collector_kv_event_batches", "KV-event batches applied to the index.", ["pool"],
                                  registry=r)
        self.kv_blocks_applied = Counter("collector_kv_event_blocks", "Blocks the index took from KV events, by "
                                         "event (stored, removed).", ["pool", "event"], registry=r)
        self.kv_gaps = Counter("collector_kv_stream_gaps", "Times a batch was missed and asked again from the "
                               "engine's replay buffer.", kv, registry=r)
        self.kv_resyncs = Counter("collector_kv_stream_resyncs", "Times the endpoint's entries were dropped and "
                                  "rebuilt: its engine restarted, or missed batches were gone from its buffer.", kv,
                                  registry=r)
        self.kv_garbage = Counter("collector_kv_stream_garbage", "Messages that were not KV-event batches, skipped.",
                                  kv, registry=r)
        self.kv_orphans = Counter("collector_kv_stream_orphans", "Blocks stored under a parent the index never saw "
                                  "(before the stream was followed), left out.", kv, registry=r)
