"""Entry point of the collector process: wires settings, Redis and the scrape loop."""

from __future__ import annotations

import argparse
import os
import socket
import uuid

import uvloop

from collector.collector import Collector, CollectorSettings
from collector.gateway_stats import GatewayTarget
from collector.metrics import CollectorMetrics
from gateway_state.lifecycle import configure_logging, connect, stop_on_signals
from gateway_state.metrics_http import serve_metrics
from gateway_state.store import StateStore


def parse_settings(argv: list[str] | None) -> tuple[str | None, CollectorSettings]:
    defaults = CollectorSettings()
    p = argparse.ArgumentParser(prog="collector", description="Scrape model-server pods into Redis load samples.")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", defaults.redis_url))
    p.add_argument("--collector-id", default=os.environ.get("COLLECTOR_ID", ""),
                   help="unique per collector (default: host name and a random suffix)")
    p.add_argument("--scrape-interval-ms", type=int, default=defaults.scrape_interval_ms)
    p.add_argument("--scrape-timeout-ms", type=int, default=defaults.scrape_timeout_ms)
    p.add_argument("--config-refresh-ms", type=int, default=defaults.config_refresh_ms)
    p.add_argument("--metrics-address", help="serve /metrics here (HOST:PORT; default: none)")
    p.add_argument("--gateway-stats", action="append", default=[], metavar="NAME=URL[,LISTENER=POOL...]",
                   help="a gateway's Envoy Prometheus page, to count requests served without a picker; "
                        "LISTENER=POOL maps a listener's counters to a pool where the gateway's name none "
                        "(Envoy Gateway: http-PORT). Repeatable")
    p.add_argument("--gateway-scrape-interval-ms", type=int, default=defaults.gateway_scrape_interval_ms)
    p.add_argument("--bypass-window-ms", type=int, default=defaults.bypass_window_ms)
    a = p.parse_args(argv)
    collector_id = a.collector_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    try:
        targets = tuple(GatewayTarget.parse(spec) for spec in a.gateway_stats)
    except ValueError as exc:
        p.error(str(exc))
    return a.metrics_address, CollectorSettings(a.redis_url, collector_id, a.scrape_interval_ms,
                                                a.scrape_timeout_ms, a.config_refresh_ms,
                                                gateway_targets=targets,
                                                gateway_scrape_interval_ms=a.gateway_scrape_interval_ms,
                                                bypass_window_ms=a.bypass_window_ms)


async def serve(metrics_address: str | None, settings: CollectorSettings) -> None:
    stop = stop_on_signals()
    redis = connect(settings.redis_url)
    metrics = CollectorMetrics()
    runner = await serve_metrics(metrics.registry, metrics_address) if metrics_address else None
    try:
        await Collector(StateStore(redis), settings, metrics).run(stop)
    finally:
        if runner is not None:
            await runner.cleanup()
        await redis.aclose()


def main(argv: list[str] | None = None) -> None:
    configure_logging()
    # libuv's loop: a collector's work is HTTP scrapes and Redis calls, event-loop bound (docs/capacity.md).
    uvloop.run(serve(*parse_settings(argv)))


if __name__ == "__main__":
    main()
