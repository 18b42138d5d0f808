"""Status as Kubernetes users read it: conditions on the objects, Events for problems.

InferencePool gets `status.parents[]`, one entry per Gateway whose HTTPRoutes
send to it (or `kind: Status, name: default` when none does), each with the
Accepted and ResolvedRefs conditions and the upstream reasons. Entries written
by other controllers (a Gateway implementation's) are left as they are.
InferenceModel, InferenceObjective and InferenceModelRewrite get an Accepted
condition. An object the controller cannot use gets a False condition whose
message names the field, and a Warning Event; its last good version keeps
serving. Status is written only when it changes.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

from controller.kube_api import EVENTS, WATCHED, KubeAPI, KubeError, Resource
from controller.manifests import ManifestError, Manifests
from controller.sources import KubeSource, object_key

log = logging.getLogger("controller")

_STATUS_PARENT = {"group": "", "kind": "Status", "name": "default"}
_CONDITION_KINDS = {"InferenceModel", "InferenceObjective", "InferenceModelRewrite"}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(kind: str, ok: bool, reason: str, message: str, generation: int) -> dict[str, Any]:
    return {"type": kind, "status": "True" if ok else "False", "reason": reason, "message": message,
            "observedGeneration": generation}


def _merge(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """New conditions keep their lastTransitionTime while their status is unchanged."""
    previous = {c.get("type"): c for c in old}
    out = []
    for c in new:
        before = previous.get(c["type"])
        same = before is not None and before.get("status") == c["status"]
        out.append({**c, "lastTransitionTime": before.get("lastTransitionTime", _now()) if same and before else _now()})
    return out


def _comparable(conditions: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return sorted((c.get("type"), c.get("status"), c.get("reason"), c.get("message"), c.get("observedGeneration"))
                  for c in conditions)


def pool_conditions(problem: ManifestError | None, generation: int) -> list[dict[str, Any]]:
    if problem is None:
        return [_condition("Accepted", True, "Accepted", "The pool is routed by the inference picker fleet.",
                           generation),
                _condition("ResolvedRefs", True, "ResolvedRefs", "All references are resolved.", generation)]
    message = f"{problem.field_message}; the last accepted version keeps serving"
    if problem.path.startswith(("spec.endpointPickerRef", "spec.extensionRef")):
        return [_condition("Accepted", True, "Accepted", "The pool is routed by the inference picker fleet.",
                           generation),
                _condition("ResolvedRefs", False, "InvalidExtensionRef", message, generation)]
    return [_condition("Accepted", False, "Invalid", message, generation),
            _condition("ResolvedRefs", True, "ResolvedRefs", "All references are resolved.", generation)]


class StatusWriter:
    def __init__(self, api: KubeAPI, source: KubeSource, controller_name: str, component: str) -> None:
        self._api = api
        self._source = source  # the objects as last watched, with their current status
        self._controller_name = controller_name
        self._component = component
        self._events_sent: set[tuple[str, str]] = set()  # (object uid, message)

    async def report(self, manifests: Manifests | None, problems: dict[str, ManifestError]) -> None:
        """Bring every watched object's status in line with what the controller made of it."""
        parents = _pool_parents(manifests) if manifests is not None else {}
        for key, obj in self._source.objects().items():
            kind, meta = obj.get("kind"), obj.get("metadata", {})
            problem = problems.get(key)
            try:
                if kind == "InferencePool":
                    await self._pool_status(obj, parents.get(f"{meta.get('namespace')}/{meta.get('name')}", []),
                                            problem)
                elif kind in _CONDITION_KINDS:
                    await self._accepted_status(obj, problem)
                if problem is not None:
                    await self._event(obj, problem)
            except KubeError as exc:
                # Status is advisory: the routing configuration is already published.
                log.warning("cannot write status of %s: %s", key, exc)

    async def _pool_status(self, obj: dict[str, Any], gateways: list[str], problem: ManifestError | None) -> None:
        meta = obj["metadata"]
        generation = int(meta.get("generation", 0))
        old = (obj.get("status") or {}).get("parents") or []
        ours = {_parent_id(p["parentRef"]): p for p in old if p.get("controllerName") == self._controller_name}
        others = [p for p in old if p.get("controllerName") != self._controller_name]
        refs = [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "namespace": g.split("/")[0],
                 "name": g.split("/")[1]} for g in gateways] or [_STATUS_PARENT]
        wanted: list[dict[str, Any]] = []
        for ref in refs:
            before = ours.get(_parent_id(ref), {}).get("conditions", [])
            wanted.append({"parentRef": ref, "controllerName": self._controller_name,
                           "conditions": _merge(before, pool_conditions(problem, generation))})
        same = len(wanted) == len(ours) and all(
            _parent_id(w["parentRef"]) in ours
            and _comparable(ours[_parent_id(w["parentRef"])].get("conditions", [])) == _comparable(w["conditions"])
            for w in wanted)
        if same:
            return
        await self._patch_status(obj, {"status": {"parents": others + wanted}})

    async def _accepted_status(self, obj: dict[str, Any], problem: ManifestError | None) -> None:
        generation = int(obj["metadata"].get("generation", 0))
        if problem is None:
            wanted = [_condition("Accepted", True, "Accepted", "Accepted by the inference picker fleet.", generation)]
        else:
            wanted = [_condition("Accepted", False, "Invalid",
                                 f"{problem.field_message}; the last accepted version keeps serving", generation)]
        old = (obj.get("status") or {}).get("conditions") or []
        if _comparable([c for c in old if c.get("type") == "Accepted"]) == _comparable(wanted):
            return
        kept = [c for c in old if c.get("type") != "Accepted"]
        await self._patch_status(obj, {"status": {"conditions": kept + _merge(old, wanted)}})

    async def _patch_status(self, obj: dict[str, Any], patch: dict[str, Any]) -> None:
        resource = _resource_of(obj)
        meta = obj["metadata"]
        await self._api.request("PATCH", resource.path(meta["namespace"], meta["name"], "status"), body=patch,
                                content_type="application/merge-patch+json")

    async def _event(self, obj: dict[str, Any], problem: ManifestError) -> None:
        meta = obj["metadata"]
        message = problem.field_message
        if (meta.get("uid", ""), message) in self._events_sent:
            return
        now = _now()
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta.get("uid", ""),
                               "resourceVersion": meta.get("resourceVersion", "")},
            "reason": "InvalidSpec", "type": "Warning",
            "message": f"{message}; the last accepted version keeps serving",
            "source": {"component": self._component}, "reportingComponent": self._component,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        await self._api.request("POST", EVENTS.path(meta["namespace"]), body=event)
        self._events_sent.add((meta.get("uid", ""), message))
        log.warning("%s: %s", object_key(obj), message)


def _parent_id(ref: dict[str, Any]) -> tuple[str, str, str]:
    return (str(ref.get("kind", "")), str(ref.get("namespace", "")), str(ref.get("name", "")))


def _resource_of(obj: dict[str, Any]) -> Resource:
    return next(r for r in WATCHED if r.api_version == obj["apiVersion"] and r.kind == obj["kind"])


def _pool_parents(m: Manifests) -> dict[str, list[str]]:
    """Pool id -> the Gateways (namespace/name) whose HTTPRoutes send to it."""
    gateways = {g.meta.id for g in m.gateways}
    out: dict[str, list[str]] = {}
    for route in m.routes:
        pools = {b.id for rule in route.rules for b in rule.backends if b.kind == "InferencePool"}
        for pool in pools:
            for gateway, _ in route.parents:
                if gateway in gateways and gateway not in out.setdefault(pool, []):
                    out[pool].append(gateway)
    return {pool: sorted(gws) for pool, gws in out.items()}
