"""Entry point of the controller process: wires settings, Redis and the reconcile loop."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import uuid
from pathlib import Path

from controller.controller import Controller, ControllerSettings
from controller.envoy_config import EnvoySettings
from gateway_state.lifecycle import configure_logging, connect, stop_on_signals
from gateway_state.store import StateStore


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}") from None


def parse_settings(argv: list[str] | None) -> ControllerSettings:
    d, e = ControllerSettings(Path("."), Path(".")), EnvoySettings()
    p = argparse.ArgumentParser(prog="controller", description="Reconcile manifests into Redis and Envoy config.")
    p.add_argument("--manifests", type=Path, required=True, help="directory of YAML manifests, watched for changes")
    p.add_argument("--envoy-config-dir", type=Path, required=True, help="where bootstrap.json, lds.json, cds.json go")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", d.redis_url))
    p.add_argument("--controller-id", default=os.environ.get("CONTROLLER_ID", ""),
                   help="unique per controller replica (default: host name and a random suffix)")
    p.add_argument("--leader-lease-ms", type=int, default=d.leader_lease_ms)
    p.add_argument("--resync-interval-ms", type=int, default=d.resync_interval_ms)
    p.add_argument("--picker-endpoint", type=_host_port, action="append", help="HOST:PORT of a picker replica")
    p.add_argument("--listen-address", default=e.listen_address, help="address Envoy's listeners bind")
    p.add_argument("--max-request-body-bytes", type=int, default=e.max_request_body_bytes)
    p.add_argument("--envoy-admin-port", type=int, default=d.envoy_admin_port)
    a = p.parse_args(argv)
    envoy = EnvoySettings(listen_address=a.listen_address,
                          picker_endpoints=tuple(a.picker_endpoint or e.picker_endpoints),
                          max_request_body_bytes=a.max_request_body_bytes)
    controller_id = a.controller_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    return ControllerSettings(a.manifests, a.envoy_config_dir, a.redis_url, a.resync_interval_ms, controller_id,
                              a.leader_lease_ms, envoy_admin_port=a.envoy_admin_port, envoy=envoy)


async def serve(settings: ControllerSettings) -> None:
    stop = stop_on_signals()
    redis = connect(settings.redis_url)
    try:
        controller = Controller(StateStore(redis), settings)
        controller.write_bootstrap()
        await controller.run(stop)
    finally:
        await redis.aclose()


def main(argv: list[str] | None = None) -> None:
    configure_logging()
    asyncio.run(serve(parse_settings(argv)))


if __name__ == "__main__":
    main()
