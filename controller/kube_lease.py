"""Leader election on a `coordination.k8s.io` Lease, the way client-go's leaderelection does it.

Operators see the leader with `kubectl get lease`. A holder's lease has
expired when its record has not changed for the lease duration by *our*
clock (we never compare our clock with the holder's), and every write is a
compare-and-swap on the resourceVersion, so two candidates cannot both win.
The Lease decides who may try to lead; the fenced Redis lease behind it still
guards every config write, so a paused ex-leader cannot overwrite its successor.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from controller.kube_api import LEASES, KubeAPI, KubeError

log = logging.getLogger("controller")


@dataclass(frozen=True)
class LeaseSettings:
    namespace: str
    name: str = "inference-picker-fleet-controller"
    # A standby takes over this long after the leader stopped renewing (client-go's default is 15 s).
    duration_s: int = 10
    # The holder rewrites the Lease this often; a Lease write costs the API server an etcd write.
    renew_interval_s: float = 2.0


def _micro_time() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    def __init__(self, api: KubeAPI, settings: LeaseSettings, identity: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._api = api
        self._settings = settings
        self._identity = identity
        self._clock = clock
        self._observed: tuple[str, float] = ("", 0.0)  # (resourceVersion, when we first saw it)
        self._renewed_at = float("-inf")
        self.leading = False

    async def campaign(self) -> bool:
        """Acquire or renew the Lease if due; True while this candidate holds it."""
        now = self._clock()
        if self.leading and now - self._renewed_at < self._settings.renew_interval_s:
            return True
        try:
            self.leading = await self._try(now)
        except (KubeError, OSError, TimeoutError) as exc:
            log.warning("cannot reach the API server for the leader Lease: %s", exc)
            # Keep leading only while our last renewal is surely still valid.
            self.leading = self.leading and now - self._renewed_at < self._settings.duration_s / 2
        return self.leading

    async def _try(self, now: float) -> bool:
        s = self._settings
        path = LEASES.path(s.namespace, s.name)
        try:
            lease = await self._api.request("GET", path)
        except KubeError as exc:
            if exc.status != 404:
                raise
            return await self._write("POST", LEASES.path(s.namespace), self._record(None, 0), now)
        spec = lease.get("spec") or {}
        version = lease["metadata"]["resourceVersion"]
        if version != self._observed[0]:
            self._observed = (version, now)
        holder = spec.get("holderIdentity") or ""
        if holder == self._identity:
            return await self._write("PUT", path, self._record(lease, int(spec.get("leaseTransitions") or 0),
                                                               keep_acquire=spec.get("acquireTime")), now)
        expired = not holder or now - self._observed[1] >= int(spec.get("leaseDurationSeconds") or s.duration_s)
        if not expired:
            if self.leading:
                log.info("lost the leader Lease to %s", holder)
            return False
        log.info("taking over the leader Lease from %s", holder or "nobody")
        return await self._write("PUT", path, self._record(lease, int(spec.get("leaseTransitions") or 0) + 1), now)

    def _record(self, current: dict[str, Any] | None, transitions: int,
                keep_acquire: str | None = None) -> dict[str, Any]:
        now = _micro_time()
        metadata: dict[str, Any] = {"name": self._settings.name, "namespace": self._settings.namespace}
        if current is not None:
            metadata["resourceVersion"] = current["metadata"]["resourceVersion"]  # compare-and-swap
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata,
                "spec": {"holderIdentity": self._identity, "leaseDurationSeconds": self._settings.duration_s,
                         "acquireTime": keep_acquire or now, "renewTime": now, "leaseTransitions": transitions}}

    async def _write(self, method: str, path: str, body: dict[str, Any], now: float) -> bool:
        try:
            written = await self._api.request(method, path, body=body)
        except KubeError as exc:
            if exc.status == 409:  # another candidate wrote first
                return False
            raise
        self._observed = (written["metadata"]["resourceVersion"], now)
        self._renewed_at = now
        return True

    async def release(self) -> None:
        """On a graceful stop, hand the Lease back so a standby need not wait for it to expire."""
        if not self.leading:
            return
        s = self._settings
        try:
            lease = await self._api.request("GET", LEASES.path(s.namespace, s.name))
            if (lease.get("spec") or {}).get("holderIdentity") == self._identity:
                lease["spec"].update(holderIdentity="", leaseDurationSeconds=1, renewTime=_micro_time())
                await self._api.request("PUT", LEASES.path(s.namespace, s.name), body=lease)
        except (KubeError, OSError, TimeoutError) as exc:
            log.warning("cannot release the leader Lease: %s", exc)
        self.leading = False
