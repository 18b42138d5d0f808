"""Entry point of a picker replica: wires settings, Redis, the snapshot, the scheduler and the servers."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import uvicorn
import uvloop
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from redis.exceptions import RedisError

from gateway_state.clock import FleetClock
from gateway_state.lifecycle import RedisClient, configure_logging, connect, every, stop_on_signals
from gateway_state.placement_store import split_figures
from gateway_state.records import pool_id
from gateway_state.script_link import ScriptLink
from gateway_state.store import StateStore
from picker.admin import AdminContext, Tokens, build_admin_app
from picker.director import Director
from picker.extproc import ExternalProcessor
from picker.flow_control import FlowController
from picker.hit_counts import HitCounts
from picker.intake import Intake
from picker.metrics import PickerMetrics
from picker.placement import Placement
from picker.roles import ProfileHandler
from picker.scheduler import Scheduler, build_profiles
from picker.settings import (
    FlowSettings,
    PickerSettings,
    PrefixSettings,
    SchedulingSettings,
    ServerSettings,
    StateSettings,
)
from picker.snapshot import SnapshotSource
from picker.state import MemoryState, PlacementState
from picker.state_guard import StateGuard
from picker.tls import self_signed_certificate
from picker.tokens import EngineTokens
from picker.writes import WriteBatcher

log = logging.getLogger("picker")
EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
# gRPC health service names: the upstream picker's probes ask for these.
LIVENESS, READINESS = "liveness", "readiness"


def parse_settings(argv: list[str] | None) -> PickerSettings:
    server, state = ServerSettings(), StateSettings()
    p = argparse.ArgumentParser(prog="picker", description="Envoy ext_proc endpoint picker backed by Redis.")
    p.add_argument("--grpc-address", default=server.grpc_address)
    p.add_argument("--grpc-health-address", default=server.health_address,
                   help="a plaintext gRPC health server for probes (liveness, readiness, the ext_proc service)")
    p.add_argument("--secure-serving", default=server.secure_serving, action=argparse.BooleanOptionalAction,
                   help="TLS with a self-signed certificate on the ext_proc port (--no-secure-serving: plaintext)")
    p.add_argument("--pool-name", help="the InferencePool served when the gateway names none")
    p.add_argument("--pool-namespace", default=os.environ.get("POD_NAMESPACE", "default"),
                   help="namespace of --pool-name")
    p.add_argument("--metrics-address", default=server.metrics_address)
    p.add_argument("--admin-address", default=server.admin_address,
                   help="serve the admin API and status page here (HOST:PORT; default: no admin API)")
    p.add_argument("--admin-tokens-file", default=os.environ.get("ADMIN_TOKENS_FILE"),
                   help="YAML `tokens: {TOKEN: read|admin}`, re-read when it changes (a mounted Secret)")
    p.add_argument("--drain-ms", type=int, default=server.drain_ms,
                   help="on SIGTERM, report NOT_SERVING this long before refusing new streams")
    p.add_argument("--shutdown-grace-ms", type=int, default=server.shutdown_grace_ms,
                   help="then let open streams finish for up to this long")
    p.add_argument("--replica-id", default=os.environ.get("PICKER_REPLICA_ID", ""),
                   help="unique per replica (default: host name and a random suffix)")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", state.redis_url))
    p.add_argument("--snapshot-refresh-ms", type=int, default=state.snapshot_refresh_ms)
    p.add_argument("--redis-timeout-ms", type=int, default=state.redis_timeout_ms)
    p.add_argument("--admission-timeout-ms", type=int, default=state.admission_timeout_ms)
    p.add_argument("--state", choices=("redis", "local"), default=state.mode,
                   help="where the prefix index and in-flight counts live (local: per-replica baseline)")
    p.add_argument("--scheduling", action="append", default=[], metavar="NAME=VALUE",
                   help="override one scheduling setting (repeatable), e.g. inflight_scale=4; "
                        "the names and their reasons are in picker/settings.py")
    p.add_argument("--flow-control", default=True, action=argparse.BooleanOptionalAction,
                   help="hold requests in a queue while their pool is saturated (--no-flow-control: send them on)")
    p.add_argument("--tokenizer", action="append", default=[], metavar="[MODEL=]PATH",
                   help="a model's tokenizer and chat template (its GGUF file, or its Hugging Face directory with "
                        "tokenizer.json and tokenizer_config.json), for pools indexed from engine events; "
                        "without MODEL= every model's (repeatable)")
    p.add_argument("--speculative-ttl-ms", type=int, default=PrefixSettings().speculative_ttl_ms,
                   help="pools indexed from engine events: how long a placement stands for its blocks until the "
                        "engine's event")
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    try:
        scheduling = SchedulingSettings.from_overrides(a.scheduling)
    except ValueError as exc:
        p.error(str(exc))
    configure_logging(a.log_level)
    replica = a.replica_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    return PickerSettings(
        server=ServerSettings(a.grpc_address, a.metrics_address, replica, drain_ms=a.drain_ms,
                              shutdown_grace_ms=a.shutdown_grace_ms, secure_serving=a.secure_serving,
                              admin_address=a.admin_address, admin_tokens_file=a.admin_tokens_file,
                              health_address=a.grpc_health_address,
                              default_pool=pool_id(a.pool_namespace, a.pool_name) if a.pool_name else None),
        state=StateSettings(a.redis_url, a.state, a.snapshot_refresh_ms, a.redis_timeout_ms,
                            admission_timeout_ms=a.admission_timeout_ms),
        scheduling=scheduling,
        flow=FlowSettings(enabled=a.flow_control),
        prefix=PrefixSettings(tokenizers=tuple(_tokenizer(t) for t in a.tokenizer),
                              speculative_ttl_ms=a.speculative_ttl_ms),
    )


def _tokenizer(value: str) -> tuple[str, str]:
    model, sep, path = value.rpartition("=")
    return (model, path) if sep and not value.startswith(("/", ".")) else ("", value)


class _EmbeddedServer(uvicorn.Server):
    """Uvicorn in the picker's own loop: the picker's handlers keep SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


@dataclass
class Picker:
    """A picker's request path, wired: what the servers and the background tasks share."""

    settings: PickerSettings
    redis: RedisClient
    store: StateStore
    metrics: PickerMetrics
    snapshots: SnapshotSource
    placement: Placement
    flow: FlowController
    director: Director
    processor: ExternalProcessor
    hits: HitCounts
    queue_guard: StateGuard

    async def heartbeat(self) -> None:
        config = self.snapshots.current.config
        await self.placement.publish(list(config.pools) if config else [])
        counts = self.hits.take()
        if counts:
            try:
                await self.store.add_hit_counts(int(time.time() // 60), counts)
            except (RedisError, OSError) as exc:
                self.hits.give_back(counts)
                log.debug("hit counts kept for the next heartbeat: %s", exc)

    async def close(self) -> None:
        """Wait for the writes still under way, then close the connections."""
        await self.placement.drain()
        await self.queue_guard.drain()
        if self.store.link is not None:
            self.store.link.close()
        await self.redis.aclose()


def build(settings: PickerSettings) -> Picker:
    redis = connect(settings.state.redis_url, timeout_s=1.0, max_connections=256)
    store = StateStore(redis, ScriptLink.for_client(redis))
    metrics = PickerMetrics()
    clock = FleetClock()
    rng = random.Random()
    # Redis mode: the shared state, and this replica's own index for while Redis cannot answer.
    # Local mode (the upstream baseline): this replica's memory is the whole state.
    memory = MemoryState()
    state: PlacementState = store if settings.state.mode == "redis" else memory
    fallback = memory if settings.state.mode == "redis" else None
    # A restarted server's cache is empty: the collectors forget it in Redis's index, the picker in its own.
    snapshots = SnapshotSource(store, settings.state, clock, metrics, memory.forget_endpoint)
    state_settings = settings.state
    guard = StateGuard(metrics, state_settings.redis_timeout_ms, state_settings.redis_backoff_ms)
    placement = Placement(state, fallback, Scheduler(build_profiles(settings.scheduling, rng)), settings, metrics,
                          clock, guard, WriteBatcher(state, fallback, guard))
    intake = Intake(settings.prefix, settings.server.max_request_body_bytes, rng,
                    EngineTokens(dict(settings.prefix.tokenizers)),
                    lambda pool: metrics.prompt_untokenized.labels(pool).inc())
    hits = HitCounts()
    roles = ProfileHandler(rng)
    # Flow control's queue is the fleet's (Redis) in Redis mode, each replica's own in local mode; its calls
    # have a guard of their own, so a failed queue call does not hold back the decisions' calls.
    queue_guard = StateGuard(metrics, state_settings.redis_timeout_ms, state_settings.redis_backoff_ms, "queue-",
                             logging.WARNING)
    flow = FlowController(store if state_settings.mode == "redis" else None, placement, snapshots, settings, metrics,
                          queue_guard)
    director = Director(snapshots, intake, roles, flow, placement, metrics, hits)
    processor = ExternalProcessor(snapshots, director, metrics, settings.server.default_pool)
    return Picker(settings, redis, store, metrics, snapshots, placement, flow, director, processor, hits, queue_guard)


async def serve(settings: PickerSettings) -> None:
    stop = stop_on_signals()
    picker = build(settings)
    metrics, snapshots, placement, flow = picker.metrics, picker.snapshots, picker.placement, picker.flow
    heartbeat = picker.heartbeat

    options = [("grpc.max_receive_message_length", 2 * settings.server.max_request_body_bytes),
               ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(options=options)
    pb_grpc.add_ExternalProcessorServicer_to_server(picker.processor, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if settings.server.secure_serving:
        server.add_secure_port(settings.server.grpc_address,
                               grpc.ssl_server_credentials([self_signed_certificate()]))
    else:
        server.add_insecure_port(settings.server.grpc_address)
    health_server = None
    if settings.server.health_address:
        health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(health, health_server)
        health_server.add_insecure_port(settings.server.health_address)
    await health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    for service in ("", READINESS, EXT_PROC_SERVICE):
        await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def metrics_handler(request: web.Request) -> web.Response:
        metrics.redis_up.set(1 if snapshots.redis_ok else 0)
        own = {pool: split_figures(placement.own.figures(pool))[0] for pool in placement.own.pools()}
        for pool in own:  # this replica's own figures, the truth, read when scraped
            metrics.inflight.labels(pool).set(placement.own.total(pool))
        metrics.observe_snapshot(snapshots.current, own)
        return web.Response(body=metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})

    async def ready_handler(request: web.Request) -> web.Response:
        ready = snapshots.current.config is not None
        return web.json_response({"ready": ready, "redis": snapshots.redis_ok}, status=200 if ready else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", ready_handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)

    admin = None
    if settings.server.admin_address:
        tokens = Tokens(Path(settings.server.admin_tokens_file) if settings.server.admin_tokens_file else None)
        admin_app = build_admin_app(AdminContext(snapshots, placement, picker.director, picker.store, tokens,
                                                 settings.server.replica_id, flow))
        host, port = _split(settings.server.admin_address)
        admin = _EmbeddedServer(uvicorn.Config(admin_app, host=host, port=port, log_level="warning",
                                               access_log=False, lifespan="off"))

    await snapshots.refresh_once()
    await server.start()
    if health_server is not None:
        await health_server.start()
    await runner.setup()
    host, port = _split(settings.server.metrics_address)
    await web.TCPSite(runner, host, port).start()
    tasks = [
        asyncio.create_task(snapshots.run(stop)),
        asyncio.create_task(every(settings.state.heartbeat_interval_ms / 1000, stop, heartbeat)),
        asyncio.create_task(every(settings.state.snapshot_refresh_ms / 1000, stop, flow.tick)),
        asyncio.create_task(every(settings.flow.poll_ms / 1000, stop, flow.poll)),
        asyncio.create_task(flow.listen(stop)),
    ]
    if admin is not None:
        tasks.append(asyncio.create_task(admin.serve()))
    # Serving once a config is known: a replica that cannot route yet gets no traffic.
    while snapshots.current.config is None and not stop.is_set():
        await asyncio.sleep(0.05)
    for service in ("", READINESS, EXT_PROC_SERVICE):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("picker %s serving ext_proc on %s (%s), metrics on %s%s", settings.server.replica_id,
             settings.server.grpc_address, "TLS" if settings.server.secure_serving else "plaintext",
             settings.server.metrics_address,
             f", pool {settings.server.default_pool} by default" if settings.server.default_pool else "")
    try:
        await stop.wait()
    finally:
        # Leave Envoy's rotation first, then let running decisions finish.
        await health.enter_graceful_shutdown()
        await asyncio.sleep(settings.server.drain_ms / 1000)
        await server.stop(grace=settings.server.shutdown_grace_ms / 1000)
        if health_server is not None:
            await health_server.stop(grace=1)
        if admin is not None:
            admin.should_exit = True
        for t in tasks:
            t.cancel()
        await runner.cleanup()
        await picker.close()


def main(argv: list[str] | None = None) -> None:
    # libuv's loop: the request path is mostly event-loop and gRPC callbacks (see docs/capacity.md).
    uvloop.run(serve(parse_settings(argv)))


if __name__ == "__main__":
    main()
