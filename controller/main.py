"""Entry point of the controller process: wires settings, the manifest source, Redis and the reconcile loop."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import uuid
from pathlib import Path

from controller.controller import Controller, ControllerSettings
from controller.envoy_config import EnvoySettings
from controller.kube_api import KubeAPI
from controller.kube_lease import LeaseElector, LeaseSettings
from controller.kube_status import StatusWriter
from controller.metrics import ControllerMetrics
from controller.sources import FileSource, KubeSettings, KubeSource, ManifestSource
from gateway_state.lifecycle import configure_logging, connect, stop_on_signals
from gateway_state.metrics_http import serve_metrics
from gateway_state.store import StateStore

# The GatewayClass-style name written into InferencePool status entries this controller owns.
CONTROLLER_NAME = "inference-picker-fleet.io/controller"
SERVICEACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}") from None


def _parser() -> argparse.ArgumentParser:
    d, e = ControllerSettings(None), EnvoySettings()
    p = argparse.ArgumentParser(prog="controller", description="Reconcile manifests into Redis and Envoy config.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifests", type=Path, help="directory of YAML manifests, watched for changes")
    source.add_argument("--kubernetes", action="store_true",
                        help="list and watch a Kubernetes API server (in-cluster, or --kubeconfig)")
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"), help="kubeconfig file (with --kubernetes)")
    p.add_argument("--watch-namespace", help="read only this namespace (default: all; needs only a Role)")
    p.add_argument("--lease-namespace", help="namespace of the leader Lease (default: the pod's own, or default)")
    p.add_argument("--envoy-config-dir", type=Path,
                   help="where bootstrap.json, lds.json, cds.json go; omit when a Gateway implementation runs Envoy")
    p.add_argument("--metrics-address", help="serve /metrics here (HOST:PORT; default: none)")
    p.add_argument("--render-envoy-only", action="store_true",
                   help="only write Envoy's files (a gateway pod's renderer): no Redis, no leadership, no status")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", d.redis_url))
    p.add_argument("--controller-id", default=os.environ.get("CONTROLLER_ID", ""),
                   help="unique per controller replica (default: host name and a random suffix)")
    p.add_argument("--leader-lease-ms", type=int, default=d.leader_lease_ms)
    p.add_argument("--resync-interval-ms", type=int, default=d.resync_interval_ms)
    p.add_argument("--picker-endpoint", type=_host_port, action="append", help="HOST:PORT of a picker replica")
    p.add_argument("--picker-tls", action="store_true",
                   help="connect Envoy to the pickers with TLS (pickers serve it by default) without verifying them")
    p.add_argument("--listen-address", default=e.listen_address, help="address Envoy's listeners bind")
    p.add_argument("--max-request-body-bytes", type=int, default=e.max_request_body_bytes)
    p.add_argument("--envoy-admin-port", type=int, default=d.envoy_admin_port)
    p.add_argument("--envoy-health-port", type=int, default=d.envoy_health_port,
                   help="serve /ready (200 while some picker is healthy) and /stats/prometheus here (default: none)")
    return p


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, ControllerSettings]:
    a = _parser().parse_args(argv)
    e = EnvoySettings()
    envoy = EnvoySettings(listen_address=a.listen_address,
                          picker_endpoints=tuple(a.picker_endpoint or e.picker_endpoints), picker_tls=a.picker_tls,
                          max_request_body_bytes=a.max_request_body_bytes,
                          config_dir=str(a.envoy_config_dir.resolve()) if a.envoy_config_dir else e.config_dir)
    controller_id = a.controller_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    if a.render_envoy_only and a.envoy_config_dir is None:
        _parser().error("--render-envoy-only needs --envoy-config-dir")
    return a, ControllerSettings(a.envoy_config_dir, a.redis_url, a.resync_interval_ms, controller_id,
                                 a.leader_lease_ms, envoy_admin_port=a.envoy_admin_port,
                                 envoy_health_port=a.envoy_health_port, envoy=envoy,
                                 publish=not a.render_envoy_only)


def _lease_namespace(a: argparse.Namespace) -> str:
    if a.lease_namespace:
        return str(a.lease_namespace)
    if SERVICEACCOUNT_NAMESPACE.exists():
        return SERVICEACCOUNT_NAMESPACE.read_text().strip()
    return str(a.watch_namespace or "default")


async def serve(a: argparse.Namespace, settings: ControllerSettings) -> None:
    stop = stop_on_signals()
    redis = connect(settings.redis_url)
    api = await KubeAPI.connect(a.kubeconfig) if a.kubernetes else None
    metrics = ControllerMetrics()
    runner = await serve_metrics(metrics.registry, a.metrics_address) if a.metrics_address else None
    source: ManifestSource
    status = lease = None
    if api is not None:
        source = kube = KubeSource(api, KubeSettings(namespace=a.watch_namespace),
                                   restarted=lambda resource, reason: metrics.watch_restarts.labels(resource,
                                                                                                    reason).inc())
        if settings.publish:
            status = StatusWriter(api, kube, CONTROLLER_NAME, "inference-picker-fleet-controller")
            lease = LeaseElector(api, LeaseSettings(_lease_namespace(a)), settings.controller_id)
    else:
        source = FileSource(a.manifests)
    try:
        controller = Controller(StateStore(redis), settings, source, metrics, status, lease)
        controller.write_bootstrap()
        await source.start()
        await controller.run(stop)
    finally:
        await source.stop()
        if lease is not None:
            await lease.release()
        if api is not None:
            await api.close()
        if runner is not None:
            await runner.cleanup()
        await redis.aclose()


def main(argv: list[str] | None = None) -> None:
    configure_logging()
    asyncio.run(serve(*parse_args(argv)))


if __name__ == "__main__":
    main()
