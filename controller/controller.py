"""The reconcile loop: manifests -> desired state -> Redis records and Envoy's files.

An invalid manifest never reaches Redis or Envoy: the error names the file, the
document and the field, and the last good configuration stays live. The config
is rewritten whenever Redis lacks it, so a flushed or replaced Redis is refilled
within one resync interval.
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
from controller.manifests import ManifestError
from controller.resources import load_directory
from gateway_state.lifecycle import every
from gateway_state.records import Config
from gateway_state.store import Deposed, StateStore

log = logging.getLogger("controller")


@dataclass(frozen=True)
class ControllerSettings:
    manifests_dir: Path
    envoy_config_dir: Path
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
    envoy: envoy_config.EnvoySettings = field(default_factory=envoy_config.EnvoySettings)

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
    def __init__(self, store: StateStore, settings: ControllerSettings) -> None:
        self._store = store
        self._settings = settings
        self._good: DesiredState | None = None
        self._resources: tuple[Any, Any] | None = None
        self._envoy_written: tuple[Any, Any] | None = None
        self.leadership: str | None = None  # "id|epoch" while this controller leads
        self._last_problem = ""
        self._last_warnings: list[str] = []
        self._prefix_seed: int | None = None
        self.generation = 0

    def write_bootstrap(self) -> Path:
        s = self._settings
        s.envoy_config_dir.mkdir(parents=True, exist_ok=True)
        path = s.envoy_config_dir / "bootstrap.json"
        write_atomically(path, envoy_config.bootstrap(str(s.envoy_config_dir.resolve()), s.envoy_admin_address,
                                                      s.envoy_admin_port))
        return path

    async def run(self, stop: asyncio.Event) -> None:
        await every(self._settings.resync_interval_ms / 1000, stop, self.reconcile_once)

    async def reconcile_once(self) -> None:
        self._load()  # standbys load too, so they are ready the moment they lead
        if self._good is None or not await self._lead():
            return
        self._write_envoy()
        await self._publish(self._good)

    async def _lead(self) -> bool:
        s = self._settings
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
        if self._resources is None or self._resources == self._envoy_written:
            return
        listeners, clusters = self._resources
        # Clusters first: new listeners may route to new clusters.
        write_atomically(self._settings.envoy_config_dir / "cds.json", {"resources": clusters})
        write_atomically(self._settings.envoy_config_dir / "lds.json", {"resources": listeners})
        self._envoy_written = self._resources
        log.info("envoy config written: %d listeners, %d clusters", len(listeners), len(clusters))

    def _load(self) -> None:
        s = self._settings
        try:
            manifests = load_directory(s.manifests_dir)
            state = build(manifests)
        except (ManifestError, OSError) as exc:
            problem = str(exc)
            if problem != self._last_problem:
                log.error("invalid manifests, keeping the last good configuration: %s", problem)
                self._last_problem = problem
            return
        if self._last_problem:
            log.info("manifests are valid again")
            self._last_problem = ""
        if state.warnings != self._last_warnings:
            for warning in state.warnings:
                log.warning("%s", warning)
            self._last_warnings = state.warnings
        self._resources = envoy_config.render(manifests, state, s.envoy)
        if self._good is None or (state.pools, state.models) != (self._good.pools, self._good.models):
            log.info("desired state: %s", ", ".join(f"pool {p.name} ({p.strategy.value}, {len(p.endpoints)} endpoints)"
                                                    for p in state.pools.values()) or "no pools")
        self._good = state

    async def _publish(self, state: DesiredState) -> None:
        assert self.leadership is not None
        try:
            current = await self._store.read_config()
            if self._prefix_seed is None:
                # Keep the deployment's seed across controller restarts, or the prefix index would go cold.
                self._prefix_seed = current.prefix_seed if current is not None else secrets.randbits(32)
            desired = (state.pools, state.models, self._prefix_seed)
            if current is not None and (current.pools, current.models, current.prefix_seed) == desired:
                self.generation = current.generation
                return
            self.generation = max(self.generation, current.generation if current else 0) + 1
            await self._store.write_config(Config(self.generation, state.pools, state.models, self._prefix_seed),
                                           self.leadership)
            log.info("config generation %d written to Redis%s", self.generation,
                     "" if current is not None else " (Redis held none)")
        except Deposed as exc:
            log.warning("deposed, write refused: %s", exc)
            self.leadership = None
        except (RedisError, ValueError) as exc:
            log.warning("cannot publish config to Redis: %s", exc)
