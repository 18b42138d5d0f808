"""Where the controller's manifests come from: a directory of YAML, or a Kubernetes API server.

Both feed the same parsers (`controller.resources.parse_object`). They differ
in what an invalid object costs:
  - files: the whole directory is rejected and the last good configuration stays;
  - Kubernetes: only that object is; its last good version keeps serving, and
    the problem is reported on the object itself (see `kube_status`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

from controller.kube_api import WATCHED, Gone, KubeAPI, KubeError, Resource
from controller.manifests import ManifestError, Manifests
from controller.resources import find_conflicts, load_directory, parse_object

log = logging.getLogger("controller")


@dataclass
class Loaded:
    manifests: Manifests | None  # None: nothing usable yet, keep what was last good
    # Each object that could not be used -> why, by where it came from (`Kind namespace/name` in Kubernetes).
    problems: dict[str, ManifestError] = field(default_factory=dict)


class ManifestSource(Protocol):
    changed: asyncio.Event  # set on news; the controller clears it before loading

    async def start(self) -> None: ...

    def load(self) -> Loaded: ...

    async def stop(self) -> None: ...


class FileSource:
    """A directory looked at on every resync and parsed again when a file in it changed (its name, size,
    modification time or inode); an editor's half-written file is just invalid for a moment."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self.changed = asyncio.Event()
        self._last: tuple[tuple[tuple[str, int, int, int], ...], Loaded] | None = None

    async def start(self) -> None:
        return None

    def load(self) -> Loaded:
        try:
            files = tuple(sorted((str(p), st.st_size, st.st_mtime_ns, st.st_ino) for p in self._directory.rglob("*")
                                 if p.suffix in (".yaml", ".yml") and (st := p.stat()) and p.is_file()))
        except OSError as exc:
            return Loaded(None, {str(self._directory): ManifestError(str(self._directory), "", str(exc))})
        if self._last is not None and self._last[0] == files:
            return self._last[1]
        try:
            loaded = Loaded(load_directory(self._directory))
        except ManifestError as exc:
            loaded = Loaded(None, {exc.where: exc})
        except OSError as exc:
            return Loaded(None, {str(self._directory): ManifestError(str(self._directory), "", str(exc))})
        self._last = (files, loaded)
        return loaded

    async def stop(self) -> None:
        return None


def object_key(obj: dict[str, Any]) -> str:
    """`Kind namespace/name`, with the API group when there is one: two groups serve InferencePool."""
    meta = obj.get("metadata") or {}
    ns = f"{meta['namespace']}/" if meta.get("namespace") else ""
    api = str(obj.get("apiVersion", ""))
    return f"{obj.get('kind')} {ns}{meta.get('name', '')}" + (f" ({api})" if "/" in api else "")


@dataclass(frozen=True)
class KubeSettings:
    # Each watch is re-opened after this, as informers do, so a silently dead connection is noticed.
    watch_timeout_s: int = 240
    # Backoff after a failed list or watch: from the first value, doubling to the last.
    backoff_s: tuple[float, float] = (0.5, 30.0)
    # A kind whose CRD is not installed is asked about again after this.
    missing_kind_retry_s: float = 30.0
    namespace: str | None = None  # None: every namespace (a ClusterRole); else only this one (a Role)


class KubeSource:
    """List and watch every kind the controller reads; `load()` parses the cached objects."""

    def __init__(self, api: KubeAPI, settings: KubeSettings, resources: tuple[Resource, ...] = WATCHED,
                 restarted: Callable[[str, str], None] = lambda resource, reason: None) -> None:
        self._api = api
        self._restarted = restarted  # (resource, reason: gone|error|disconnected) for the metrics
        self._settings = settings
        self._resources = resources
        self._objects: dict[Resource, dict[str, dict[str, Any]]] = {r: {} for r in resources}
        self._synced: set[Resource] = set()
        # object key -> (resourceVersion, what it parsed to), and its last version that parsed
        self._parsed: dict[str, tuple[str, Manifests | ManifestError]] = {}
        self._good: dict[str, Manifests] = {}
        self._loaded: Loaded | None = None  # the last load, until a change
        self._tasks: list[asyncio.Task[None]] = []
        self.changed = asyncio.Event()
        self.relists = 0  # lists after the first, as after a 410 Gone

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._follow(r), name=f"watch {r.plural}") for r in self._resources]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def objects(self) -> dict[str, dict[str, Any]]:
        """Every watched object as last seen, by object key."""
        return {key: obj for objects in self._objects.values() for key, obj in objects.items()}

    @property
    def synced(self) -> bool:
        return len(self._synced) == len(self._resources)

    def load(self) -> Loaded:
        if not self.synced:
            # A partial view would publish a configuration missing pools or pods.
            return Loaded(None)
        if self._loaded is None:  # nothing changed since the last load: the same answer
            self._loaded = self._parse()
        return self._loaded

    def _parse(self) -> Loaded:
        """Each object parsed once per version; an invalid one contributes its last good version."""
        problems: dict[str, ManifestError] = {}
        current = self.objects()
        for key, obj in current.items():
            version = obj.get("metadata", {}).get("resourceVersion", "")
            known = self._parsed.get(key)
            if known is None or known[0] != version:
                part = Manifests()
                try:
                    parse_object(obj, key, part, name_in_where=False)
                    known = (version, part)
                except ManifestError as exc:
                    known = (version, exc)
                self._parsed[key] = known
            if isinstance(known[1], ManifestError):
                problems[key] = known[1]
            else:
                self._good[key] = known[1]
        # Deleted objects leave with their last good version.
        self._parsed = {k: v for k, v in self._parsed.items() if k in current}
        self._good = {k: v for k, v in self._good.items() if k in current}
        out = _merged(self._good.values())
        conflicts = find_conflicts(out)
        for conflict in conflicts:
            problems[conflict.where] = conflict
        if conflicts:
            out = _merged([out], {c.where for c in conflicts})
        return Loaded(out, problems)

    async def _follow(self, resource: Resource) -> None:
        ns = self._settings.namespace
        backoff = self._settings.backoff_s[0]
        version = ""
        while True:
            try:
                if not version:
                    items, version = await self._api.list(resource, ns)
                    self._replace(resource, items)
                async for kind, obj in self._api.watch(resource, version, self._settings.watch_timeout_s, ns):
                    version = obj.get("metadata", {}).get("resourceVersion", version)
                    if kind != "BOOKMARK":
                        self._apply(resource, kind, obj)
                backoff = self._settings.backoff_s[0]
            except asyncio.CancelledError:
                raise
            except Gone:
                log.info("watch of %s expired (410 Gone); listing again", resource.plural)
                version = ""
                self.relists += 1
                self._restarted(resource.plural, "gone")
            except KubeError as exc:
                if exc.status == 404 and not version:
                    # The kind's CRD is not installed: it has no objects until it is.
                    if resource not in self._synced:
                        log.info("%s is not served by the API server; treating it as empty", resource.api_version
                                 + "/" + resource.plural)
                    self._replace(resource, [])
                    await asyncio.sleep(self._settings.missing_kind_retry_s)
                    continue
                log.warning("%s: %s; retrying in %.1f s", resource.plural, exc, backoff)
                self._restarted(resource.plural, "error")
                version = "" if exc.status in (403, 404) else version
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._settings.backoff_s[1])
            except (OSError, ValueError, TimeoutError) as exc:
                # A dropped connection: resume the watch from the last version seen.
                log.warning("watching %s failed: %r; retrying in %.1f s", resource.plural, exc, backoff)
                self._restarted(resource.plural, "disconnected")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._settings.backoff_s[1])

    def _replace(self, resource: Resource, items: list[dict[str, Any]]) -> None:
        fresh = {object_key(obj): obj for obj in items}
        if resource not in self._synced or fresh != self._objects[resource]:
            self._objects[resource] = fresh
            self._loaded = None
            self.changed.set()
        self._synced.add(resource)

    def _apply(self, resource: Resource, kind: str, obj: dict[str, Any]) -> None:
        obj = {"apiVersion": resource.api_version, "kind": resource.kind, **obj}
        key = object_key(obj)
        if kind == "DELETED":
            self._objects[resource].pop(key, None)
        else:
            self._objects[resource][key] = obj
        self._loaded = None
        self.changed.set()


def _merged(parts: Iterable[Manifests], drop: frozenset[str] | set[str] = frozenset()) -> Manifests:
    """One Manifests of many, less the objects whose `where` is in `drop` (conflicting duplicates)."""
    out = Manifests()
    for part in parts:
        for f in fields(Manifests):
            items = getattr(part, f.name)
            getattr(out, f.name).extend(items if f.name == "ignored" else
                                        (i for i in items if i.meta.where not in drop))
    return out
