"""The reconcile loop: manifests -> desired state -> Redis records and Envoy's files.

Manifests come from a source (a directory, or a Kubernetes API server). An
invalid manifest never reaches Redis or Envoy: the error names the object and
the field, and the last good configuration stays live. The config is
rewritten whenever Redis lacks it, so a flushed or replaced Redis is refilled
within one resync interval. A change the source reports is reconciled at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from controller import envoy_config
from controller.desired import DesiredState, build
from controller.kube_lease import LeaseElector
from controller.kube_status import StatusWriter
from controller.manifests import ManifestError, Manifests
from controller.metrics import ControllerMetrics
from controller.sources import ManifestSource
from gateway_state.config_store import Deposed
from gateway_state.records import Config
from gateway_state.store import StateStore

log = logging.getLogger("controller")


@dataclass(frozen=True)
class ControllerSettings:
    # Where Envoy's bootstrap, listeners and clusters go; None when a Gateway
    # implementation runs Envoy and only asks the pickers (the drop-in picker).
    envoy_config_dir: Path | None
    redis_url: str = "redis://127.0.0.1:6379/0"
    # How often manifests are re-read, Redis is checked and the leader lease renewed;
    # bounds how long a flushed Redis stays empty and how fast a change takes effect.
    resync_interval_ms: int = 500
    # Unique per controller replica; one leader writes, the others stand by.
    controller_id: str = "controller"
    # A leader that stops renewing is replaced after this: a standby takes over
    # within the lease plus one resync interval (under 5 s with the defaults).
    leader_lease_ms: int = 3000
    envoy_admin_address: str = "127.0.0.1"
    envoy_admin_port: int = 9901
    # Envoy's listener for the platform (`/ready` while some picker is healthy, `/stats/prometheus`);
    # 0: none. It binds the listeners' address.
    envoy_health_port: int = 0
    envoy: envoy_config.EnvoySettings = field(default_factory=envoy_config.EnvoySettings)
    # False: only render Envoy's files, as a gateway pod's own renderer does beside its Envoy;
    # no leadership, no Redis, no status (the publishing controllers do those).
    publish: bool = True

    def __post_init__(self) -> None:
        if not 50 <= self.resync_interval_ms <= 600_000:
            raise ValueError("resync_interval_ms must be between 50 and 600000")
        if self.leader_lease_ms < 3 * self.resync_interval_ms:
            raise ValueError("leader_lease_ms must cover at least three resync intervals")
        if not self.controller_id or "|" in self.controller_id:
            raise ValueError("controller_id must be set and must not contain '|'")


def write_atomically(path: Path, data: Any) -> None:
    """Envoy watches the directory for moves, so it only ever sees whole files."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # controllers may share the directory
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


class Controller:
    def __init__(self, store: StateStore, settings: ControllerSettings, source: ManifestSource,
                 metrics: ControllerMetrics, status: StatusWriter | None = None,
                 lease: LeaseElector | None = None) -> None:
        self._store = store
        self._metrics = metrics
        self._settings = settings
        self._source = source
        self._status = status  # Kubernetes only: conditions and Events on the objects
        self._lease = lease  # Kubernetes only: the visible leader election in front of Redis's
        self._good: DesiredState | None = None
        self._manifests: Manifests | None = None
        self._resources: envoy_config.Rendered | None = None
        self._envoy_written: envoy_config.Rendered | None = None
        self.leadership: str | None = None  # "id|epoch" while this controller leads
        self._last_problem = ""
        self._last_warnings: list[str] = []
        self._prefix_seed: int | None = None
        self.generation = 0

    def write_bootstrap(self) -> Path | None:
        s = self._settings
        if s.envoy_config_dir is None:
            return None
        s.envoy_config_dir.mkdir(parents=True, exist_ok=True)
        path = s.envoy_config_dir / "bootstrap.json"
        write_atomically(path, envoy_config.bootstrap(str(s.envoy_config_dir.resolve()), s.envoy_admin_address,
                                                      s.envoy_admin_port, s.envoy.listen_address,
                                                      s.envoy_health_port))
        return path

    async def run(self, stop: asyncio.Event) -> None:
        """Reconcile every resync interval, and at once when the source reports a change."""
        changed = self._source.changed
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                changed.clear()
                await self.reconcile_once()
                waiting = asyncio.ensure_future(changed.wait())
                await asyncio.wait((stopping, waiting), timeout=self._settings.resync_interval_ms / 1000,
                                   return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()
        finally:
            stopping.cancel()

    async def reconcile_once(self) -> None:
        problems = self._load()  # standbys load too, so they are ready the moment they lead
        self._metrics.invalid_resources.set(len(problems))
        self._metrics.reconciles.labels("no_source" if self._good is None else "invalid" if problems else "ok").inc()
        if self._good is not None and not self._settings.publish:
            self._write_envoy()
            return
        leading = self._good is not None and await self._lead()
        self._metrics.leader.set(1 if leading else 0)
        if not leading or self._good is None:
            return
        self._write_envoy()
        await self._publish(self._good)
        if self._status is not None:
            await self._status.report(self._manifests, problems)

    async def _lead(self) -> bool:
        s = self._settings
        if self._lease is not None and not await self._lease.campaign():
            if self.leadership:
                log.info("standing by; another controller holds the leader Lease")
                self.leadership = None
            return False
        try:
            holder = await self._store.lead(s.controller_id, s.leader_lease_ms)
        except RedisError as exc:
            # Without Redis nothing can be published; Envoy keeps its last files.
            log.warning("cannot reach Redis for the leader lease: %s", exc)
            return False
        mine = holder if holder.startswith(s.controller_id + "|") else None
        if mine != self.leadership:
            if mine:
                log.info("leading as %s", mine)
            else:
                log.info("standing by; the leader is %s", holder)
            self.leadership = mine
        return mine is not None

    def _write_envoy(self) -> None:
        if self._settings.envoy_config_dir is None or self._resources is None \
                or self._resources == self._envoy_written:
            return
        directory, rendered = self._settings.envoy_config_dir, self._resources
        # Endpoints first, then clusters, then listeners: each may name what the one before defines.
        for name, assignment in rendered.endpoints.items():
            if self._envoy_written is None or self._envoy_written.endpoints.get(name) != assignment:
                write_atomically(directory / name, {"resources": [assignment]})
        write_atomically(directory / "cds.json", {"resources": rendered.clusters})
        write_atomically(directory / "lds.json", {"resources": rendered.listeners})
        for stale in directory.glob(envoy_config.eds_file("*")):  # pools deleted, even while this one was down
            if stale.name not in rendered.endpoints:
                stale.unlink(missing_ok=True)
        self._envoy_written = rendered
        log.info("envoy config written: %d listeners, %d clusters", len(rendered.listeners), len(rendered.clusters))

    def _load(self) -> dict[str, ManifestError]:
        """Load the source; returns the objects it could not use (already logged)."""
        s = self._settings
        loaded = self._source.load()
        problem = "; ".join(str(p) for p in loaded.problems.values())
        if problem != self._last_problem:
            if problem:
                log.error("invalid manifests, keeping the last good configuration: %s", problem)
            else:
                log.info("manifests are valid again")
            self._last_problem = problem
        if loaded.manifests is None:
            return loaded.problems
        manifests = loaded.manifests
        state = build(manifests)
        if state.warnings != self._last_warnings:
            for warning in state.warnings:
                log.warning("%s", warning)
            self._last_warnings = state.warnings
        self._resources = envoy_config.render(manifests, state, s.envoy)
        self._manifests = manifests
        if self._good is None or (state.pools, state.models, state.objectives) != (
                self._good.pools, self._good.models, self._good.objectives):
            log.info("desired state: %s", ", ".join(f"pool {p.name} ({p.strategy.value}, {len(p.endpoints)} endpoints)"
                                                    for p in state.pools.values()) or "no pools")
        self._good = state
        return loaded.problems

    async def _publish(self, state: DesiredState) -> None:
        assert self.leadership is not None
        try:
            current = await self._store.read_config()
            if self._prefix_seed is None:
                # Keep the deployment's seed across controller restarts, or the prefix index would go cold.
                self._prefix_seed = current.prefix_seed if current is not None else secrets.randbits(32)
            desired = (state.pools, state.models, self._prefix_seed, state.objectives)
            if current is not None and (current.pools, current.models, current.prefix_seed,
                                        current.objectives) == desired:
                self.generation = current.generation
                self._metrics.generation.set(self.generation)
                return
            self.generation = max(self.generation, current.generation if current else 0) + 1
            await self._store.write_config(Config(self.generation, state.pools, state.models, self._prefix_seed,
                                                  state.objectives), self.leadership)
            self._metrics.generation.set(self.generation)
            log.info("config generation %d written to Redis%s", self.generation,
                     "" if current is not None else " (Redis held none)")
        except Deposed as exc:
            log.warning("deposed, write refused: %s", exc)
            self.leadership = None
        except (RedisError, ValueError) as exc:
            self._metrics.reconciles.labels("redis_error").inc()
            log.warning("cannot publish config to Redis: %s", exc)
