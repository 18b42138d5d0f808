"""From a request body to the endpoint that serves it, with the shared state around the decision.

Per request: one Redis round trip before scoring (in-flight counts over every
replica and the prefix blocks each endpoint holds), the pure scheduling step,
then one small round trip counting the request in flight at the chosen endpoint.
The prompt's blocks are indexed under that endpoint after the answer has gone
back to Envoy, off the request's path. Each Redis call has a deadline; past it
the decision falls back to this replica's own in-flight counts, so a slow or
dead Redis slows nothing and fails nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, replace

from redis.exceptions import RedisError

from gateway_state.records import Model, Pool, Strategy
from gateway_state.store import SharedView, StateStore
from picker.errors import NoEndpoint, NotFound, PickerUnavailable
from picker.local_state import LocalState
from picker.metrics import PickerMetrics
from picker.plugins.framework import Candidate, SchedulingRequest
from picker.plugins.pickers import replica_share
from picker.prefix import block_hashes, capacity_blocks, prompt_text
from picker.request import parse_body
from picker.scheduler import Scheduler
from picker.settings import PickerSettings
from picker.snapshot import SnapshotSource

log = logging.getLogger("picker")


@dataclass(frozen=True)
class Routed:
    model: str
    target_model: str
    pool: str
    strategy: Strategy
    endpoints: list[Candidate]  # chosen first
    body: bytes | None  # the rewritten body, when the target model differs
    prompt_blocks: int
    matched_blocks: int
    work_blocks: int  # the prompt's blocks the chosen endpoint must compute: in flight until release
    recorded_shared: bool  # the in-flight count reached Redis and must be released there
    decision_seconds: float  # body received to decision recorded, Redis round trips included
    schedule_seconds: float  # the scheduling runner alone: filters, scorers, picker

    @property
    def chosen(self) -> Candidate:
        return self.endpoints[0]


class RequestRouter:
    def __init__(self, store: StateStore, snapshots: SnapshotSource, scheduler: Scheduler,
                 settings: PickerSettings, metrics: PickerMetrics, rng: random.Random) -> None:
        self._store = store
        self._snapshots = snapshots
        self._scheduler = scheduler
        self._settings = settings
        self._metrics = metrics
        self._rng = rng
        self._local = LocalState()
        self._shared = settings.state.mode == "redis"
        self._background: set[asyncio.Task[None]] = set()

    def models(self, pool: str | None) -> list[Model]:
        config = self._snapshots.current.config
        if config is None:
            return []
        return [m for m in config.models.values() if pool is None or m.pool == pool]

    async def route(self, route_pool: str | None, raw_body: bytes) -> Routed:
        started = time.perf_counter()
        parsed = parse_body(raw_body, self._settings.server.max_request_body_bytes)
        snapshot = self._snapshots.current
        if snapshot.config is None:
            raise PickerUnavailable("no configuration loaded from Redis yet")
        model = snapshot.config.models.get(parsed.model)
        if model is None or (route_pool is not None and model.pool != route_pool):
            raise NotFound(f"The model `{parsed.model}` does not exist.", param="model")
        pool = snapshot.config.pools.get(model.pool)
        if pool is None or not pool.endpoints:
            raise NoEndpoint(f"Pool {model.pool} has no ready endpoint.")
        target = self._target(model)
        body = None
        if target != parsed.model:
            body = json.dumps({**parsed.body, "model": target}, ensure_ascii=False).encode()

        p = self._settings.prefix
        text = prompt_text(parsed.body)
        hashes: list[str] = []
        if pool.strategy == Strategy.PREFIX_CACHE:
            hashes = block_hashes(text, target, snapshot.config.prefix_seed, p.block_chars, p.max_blocks)
        prompt = SchedulingRequest(target, model.criticality, len(hashes), hashes[0] if hashes else "",
                                   -(-len(text) // p.block_chars))
        # At most two rounds: the second when another replica took the chosen endpoint meanwhile.
        for check in (True, False):
            view, others = await self._shared_view(pool, hashes)
            candidates = self._candidates(pool, snapshot.load.get(pool.name, {}), view)
            request = replace(prompt, preferred=replica_share([e.key for e in pool.endpoints], view.replicas,
                                                              self._settings.server.replica_id))
            decision = self._scheduler.schedule(pool.strategy, request, candidates)
            chosen = decision.endpoints[0]
            work = max(0, request.work_blocks - chosen.matched_blocks)
            seen = others.inflight.get(chosen.endpoint.key, 0) if check and others is not None else -1
            recorded = await self._record(pool, chosen, hashes, work, seen)
            if recorded is not None:
                break
            self._metrics.placement_conflicts.labels(pool.name).inc()
        if recorded and hashes:
            self._later(self._index(pool, chosen, hashes))
        return Routed(parsed.model, target, pool.name, pool.strategy, decision.endpoints, body, len(hashes),
                      chosen.matched_blocks, work, bool(recorded), time.perf_counter() - started, decision.seconds)

    def _target(self, model: Model) -> str:
        if len(model.targets) == 1:
            return model.targets[0].name
        return self._rng.choices([t.name for t in model.targets], weights=[t.weight for t in model.targets])[0]

    def _candidates(self, pool: Pool, samples: dict, view: SharedView) -> list[Candidate]:
        now_ms = int(time.time() * 1000)
        max_age = self._settings.state.max_sample_age_ms
        out = []
        for e in pool.endpoints:
            sample = samples.get(e.key)
            fresh = sample if sample is not None and sample.ok and now_ms - sample.scraped_at_ms <= max_age else None
            out.append(Candidate(e, fresh, sample.consecutive_failures if sample else 0,
                                 view.inflight.get(e.key, 0), view.matched_blocks.get(e.key, 0),
                                 view.inflight_work.get(e.key, 0)))
        return out

    async def _shared_view(self, pool: Pool, hashes: list[str]) -> tuple[SharedView, SharedView | None]:
        """The view to score on, and what the other replicas alone contributed (None without Redis).

        This replica's own requests come from its memory, exact and immediate, so its
        concurrent decisions see each other before Redis does; the other replicas'
        come from Redis.
        """
        if not self._shared:
            return self._local.view(pool.name, hashes), None
        try:
            async with asyncio.timeout(self._settings.state.redis_timeout_ms / 1000):
                others = await self._store.lookup(pool.name, hashes, int(time.time() * 1000),
                                                  leave_out=self._settings.server.replica_id)
        except (RedisError, OSError, TimeoutError) as exc:
            self._metrics.redis_fallbacks.labels("lookup").inc()
            log.debug("shared lookup failed, scoring locally: %s", exc)
            return self._local.view(pool.name, ()), None
        # Read after the await: decisions this replica made meanwhile must count.
        own = self._local.view(pool.name, ())
        return SharedView(dict(Counter(others.inflight) + Counter(own.inflight)), others.matched_blocks,
                          dict(Counter(others.inflight_work) + Counter(own.inflight_work)), others.replicas), others

    async def _record(self, pool: Pool, chosen: Candidate, hashes: list[str], work: int,
                      others_seen: int) -> bool | None:
        """Count the request here and in Redis: True when Redis has it, False when only here,
        None (nothing counted) when another replica took the endpoint since `others_seen`."""
        endpoint = chosen.endpoint.key
        # This replica's own figures live here, and its next decisions read them at once.
        self._local.admit(pool.name, endpoint, work)
        if not self._shared:
            self._local.index(pool.name, endpoint, hashes, self._capacity(chosen))
            return False
        s = self._settings.state
        try:
            async with asyncio.timeout(s.redis_timeout_ms / 1000):
                admitted = await self._store.admit(pool.name, self._settings.server.replica_id, endpoint,
                                                   int(time.time() * 1000), s.inflight_lease_ms, work, others_seen)
        except (RedisError, OSError, TimeoutError) as exc:
            self._metrics.redis_fallbacks.labels("admit").inc()
            log.debug("shared admission failed: %s", exc)
            return False
        if not admitted:
            self._local.release(pool.name, endpoint, work)
            return None
        return True

    def _capacity(self, chosen: Candidate) -> int:
        p, load = self._settings.prefix, chosen.load
        return capacity_blocks(load.block_size if load else 0, load.num_blocks if load else 0,
                               p.chars_per_token, p.block_chars, p.default_capacity_blocks)

    async def _index(self, pool: Pool, chosen: Candidate, hashes: list[str]) -> None:
        """The chosen endpoint now holds the prompt's blocks, for every replica's next lookups."""
        try:
            async with asyncio.timeout(self._settings.state.redis_timeout_ms * 10 / 1000):
                await self._store.index(pool.name, chosen.endpoint.key, hashes, int(time.time() * 1000),
                                        self._settings.prefix.ttl_ms, self._capacity(chosen))
        except (RedisError, OSError, TimeoutError) as exc:
            self._metrics.redis_fallbacks.labels("index").inc()
            log.debug("shared prefix index write failed: %s", exc)

    def _later(self, work: Coroutine[None, None, None]) -> None:
        # Off the request's path (a prefix index write, a release); kept referenced so it
        # runs to the end, and drained on shutdown.
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for the writes still under way after their requests (shutdown)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def release_later(self, routed: Routed) -> None:
        """The request ended (Envoy closed the stream). Its stream may be cancelled, so
        the release runs in a task of its own and always completes."""
        self._later(self._release(routed))

    async def _release(self, routed: Routed) -> None:
        self._local.release(routed.pool, routed.chosen.endpoint.key, routed.work_blocks)
        if not routed.recorded_shared:
            return
        try:
            # Off the request path, so a slower Redis may take longer before the lease expires the count.
            async with asyncio.timeout(self._settings.state.redis_timeout_ms * 10 / 1000):
                await self._store.release(routed.pool, self._settings.server.replica_id, routed.chosen.endpoint.key,
                                          routed.work_blocks)
        except (RedisError, OSError, TimeoutError) as exc:
            self._metrics.redis_fallbacks.labels("release").inc()
            log.debug("shared release failed (the lease will expire it): %s", exc)

    async def renew_leases(self) -> None:
        """Keep this replica's in-flight counts alive in every pool."""
        config = self._snapshots.current.config
        if config is None or not self._shared:
            return
        now, lease = int(time.time() * 1000), self._settings.state.inflight_lease_ms
        for pool in config.pools:
            try:
                await self._store.heartbeat(pool, self._settings.server.replica_id, now, lease)
            except (RedisError, OSError) as exc:
                log.debug("lease renewal failed: %s", exc)
                return
