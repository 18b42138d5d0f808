"""The scrape loop: every endpoint of every pool, concurrently, each interval."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
from redis.exceptions import RedisError

from collector.gateway_stats import GatewayScraper, GatewayTarget
from collector.kv_streams import KvStreams
from collector.metrics import CollectorMetrics
from collector.metrics_map import GarbledMetrics, to_load_sample
from gateway_state.clock import FleetClock
from gateway_state.lifecycle import cancel_and_wait, every
from gateway_state.records import Config, Endpoint, LoadSample, Runtime
from gateway_state.sharding import owned
from gateway_state.store import StateStore

log = logging.getLogger("collector")


@dataclass(frozen=True)
class CollectorSettings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Names this collector among those sharing the scrape work; unique per process.
    collector_id: str = "collector"
    # Upstream pickers refresh metrics every 50 ms; 100 ms halves the scrape work
    # and is still far shorter than the time a queue takes to build.
    scrape_interval_ms: int = 100
    # A pod that cannot answer /metrics in this time is treated as failing.
    scrape_timeout_ms: int = 1000
    # Endpoints change on pod churn, not per request: re-read the config each second.
    config_refresh_ms: int = 1000
    # A collector renews its membership this often; one that stops renewing for
    # the lease is gone, and the others take its endpoints. Heartbeat plus lease
    # plus one scrape stays under the 3 s a dead collector's endpoints may go stale.
    membership_heartbeat_ms: int = 500
    membership_lease_ms: int = 1500
    # Gateways whose Envoy counters say how many requests were served without a picker (gateway_stats).
    gateway_targets: tuple[GatewayTarget, ...] = ()
    # Envoy's counters move per request, not per step: a second is fine-grained for a ratio over a minute.
    gateway_scrape_interval_ms: int = 1000
    # The status page's bypass ratio spans this long: a minute, as the alert's rate does at its shortest.
    bypass_window_ms: int = 60_000

    def __post_init__(self) -> None:
        if not 10 <= self.scrape_interval_ms <= 60_000:
            raise ValueError("scrape_interval_ms must be between 10 and 60000")
        if self.scrape_timeout_ms <= 0 or self.config_refresh_ms <= 0:
            raise ValueError("scrape_timeout_ms and config_refresh_ms must be positive")
        if self.membership_lease_ms < 2 * self.membership_heartbeat_ms:
            raise ValueError("membership_lease_ms must cover at least two heartbeats")
        if not 100 <= self.gateway_scrape_interval_ms <= self.bypass_window_ms:
            raise ValueError("gateway_scrape_interval_ms must be at least 100 and within bypass_window_ms")
        if len({t.name for t in self.gateway_targets}) != len(self.gateway_targets):
            raise ValueError("gateway targets need distinct names")


class Collector:
    def __init__(self, store: StateStore, settings: CollectorSettings, metrics: CollectorMetrics) -> None:
        self._store = store
        self._settings = settings
        self._metrics = metrics
        self._clock = FleetClock()
        self._config: Config | None = None
        self._config_read_at = 0.0
        self._last: dict[str, LoadSample] = {}  # endpoint -> last sample, to carry figures over failures
        # endpoint -> (scraped at ms, uncached prompt tokens) over the last PREFILL_WINDOW_MS
        self._prefill_history: dict[str, deque[tuple[int, float]]] = {}
        self._forget: set[tuple[str, str]] = set()  # (pool, endpoint): a restarted server's entries still to drop
        self.members: list[str] = []  # live collectors, this one included; empty while unknown
        self._kv = KvStreams(store, settings.collector_id, metrics, self._clock)  # engines' KV-cache events
        # A sample no collector has refreshed for three intervals is from a gateway nobody reads any more.
        self._gateways = GatewayScraper(settings.gateway_targets, store, metrics.gateways, settings.bypass_window_ms,
                                        keep_ms=max(3 * settings.gateway_scrape_interval_ms, 5000))

    async def run(self, stop: asyncio.Event) -> None:
        s = self._settings
        timeout = aiohttp.ClientTimeout(total=s.scrape_timeout_ms / 1000)
        headers = {"User-Agent": f"inference-picker-collector/{s.collector_id}"}
        async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
            membership = asyncio.create_task(every(s.membership_heartbeat_ms / 1000, stop,
                                                   lambda: _round("membership", self.renew_membership())))
            gateways = asyncio.create_task(every(s.gateway_scrape_interval_ms / 1000, stop,
                                                 lambda: _round("gateway scrape", self.scrape_gateways(session))))
            try:
                await every(s.scrape_interval_ms / 1000, stop, lambda: _round("scrape", self.scrape_once(session)))
            finally:
                await cancel_and_wait(membership, gateways)
                await self._kv.close()
                try:
                    await self._store.leave_collectors(s.collector_id)  # the others take over at once
                except RedisError as exc:
                    log.warning("cannot leave the collector set: %s", exc)

    async def renew_membership(self) -> None:
        s = self._settings
        try:
            redis_now_ms, members = await self._store.collector_heartbeat(s.collector_id, s.membership_lease_ms)
        except RedisError as exc:
            log.warning("cannot renew membership, scraping by the last member list: %s", exc)
            return
        self._clock.observe(redis_now_ms)
        if members != self.members:
            log.info("collectors: %s", ", ".join(members))
            self.members = members
        self._metrics.members.set(len(members))

    async def scrape_gateways(self, session: aiohttp.ClientSession) -> None:
        targets = self._gateways.targets
        if targets:
            mine = owned([t.name for t in targets], self.members, self._settings.collector_id)
            await self._gateways.scrape_once(session, mine, self._clock.now_ms())

    async def scrape_once(self, session: aiohttp.ClientSession) -> None:
        """One round: every endpoint this collector owns scraped once, however many pools list it (pools may
        share servers), and each pool's samples published with that pool's requests in flight there."""
        config = await self._current_config()
        if config is None:
            return
        all_keys = [e.key for pool in config.pools.values() for e in pool.endpoints]
        mine = owned(all_keys, self.members, self._settings.collector_id)
        pools = {pool.name: tuple(e for e in pool.endpoints if e.key in mine) for pool in config.pools.values()}
        runtimes = {pool.name: pool.runtime for pool in config.pools.values()}
        self._metrics.endpoints_owned.set(len(mine))
        self._kv.reconcile(config, set(mine))
        servers = {e.key: (e, runtimes[name]) for name, endpoints in pools.items() for e in endpoints}
        before = dict(self._last)
        # The fleet's requests in flight at each endpoint as it is scraped: what else it ran came from
        # elsewhere (LoadSample.gateway_inflight). Read before and after, the larger count: a request
        # the endpoint held when scraped was admitted before it, and released after.
        inflight_before = await self._inflight(pools)
        scraped = await asyncio.gather(*(self._scrape(session, e, runtime) for e, runtime in servers.values()))
        inflight_after = await self._inflight(pools)
        samples = dict(zip(servers, scraped, strict=True))
        self._last.update(samples)
        # A server is a new process once, whichever pools list it: each of them forgets its entries (until
        # that is written, even if Redis fails now and the next rounds no longer see the counter fall).
        self._forget |= {(name, key) for name, endpoints in pools.items() for e in endpoints
                         if (key := e.key) in before and samples[key].restarted_since(before[key])}
        now_ms = self._clock.now_ms()
        for name, endpoints in pools.items():
            counted, after = inflight_before.get(name), inflight_after.get(name)
            mine_here = {e.key: samples[e.key] for e in endpoints}
            if counted is not None and after is not None:
                mine_here = {key: replace(s, gateway_inflight=max(counted.get(key, 0), after.get(key, 0)))
                             if s.ok else s for key, s in mine_here.items()}
            self._kv.observe(name, mine_here)
            good = [s.scraped_at_ms for s in mine_here.values() if s.scraped_at_ms > 0]
            self._metrics.sample_age.labels(name).set(max(0, now_ms - min(good)) / 1000 if good else 0)
            try:
                await self._store.write_load(name, mine_here)
                for key in sorted(key for pool, key in self._forget if pool == name):
                    self._kv.restarted(name, key)
                    await self._store.forget_endpoint(name, key)
                    self._forget.discard((name, key))
                    log.info("endpoint %s restarted (its prompt-token counter fell): "
                             "forgot its prefix-index entries in pool %s", key, name)
            except RedisError as exc:
                log.warning("cannot publish load of pool %s: %s", name, exc)

    async def _inflight(self, pools: dict[str, tuple[Endpoint, ...]]) -> dict[str, dict[str, int] | None]:
        """Per pool with endpoints here, the fleet's requests in flight at each; None where Redis did not
        answer (that pool's samples then say nothing of the gateway's share)."""
        async def of(pool: str) -> dict[str, int] | None:
            try:
                return (await self._store.lookup(pool, [])).inflight
            except RedisError:
                return None

        names = [name for name, endpoints in pools.items() if endpoints]
        return dict(zip(names, await asyncio.gather(*(of(name) for name in names)), strict=True))

    async def _current_config(self) -> Config | None:
        now = time.monotonic()
        if self._config is None or now - self._config_read_at >= self._settings.config_refresh_ms / 1000:
            try:
                config = await self._store.read_config()
            except (RedisError, ValueError) as exc:
                log.warning("cannot read config, keeping the last one: %s", exc)
                return self._config
            if config is not None and config != self._config:  # none: Redis lost it; keep what we knew
                previous, self._config = self._config, config
                await self._prune(config, previous)
            self._config_read_at = now
        return self._config

    async def _prune(self, config: Config, previous: Config | None) -> None:
        """Drop the samples (and prefill counter readings) of endpoints that left their pool, here and in Redis,
        and their blocks from an index built from engine events (any collector that sees it go does it)."""
        current = {e.key for pool in config.pools.values() for e in pool.endpoints}
        self._last = {e: s for e, s in self._last.items() if e in current}
        self._prefill_history = {e: h for e, h in self._prefill_history.items() if e in current}
        self._forget = {(pool, e) for pool, e in self._forget if pool in config.pools and e in current}
        try:
            for pool in config.pools.values():
                await self._store.prune_load(pool.name, {e.key for e in pool.endpoints})
            for pool in (previous.pools.values() if previous else ()):
                now = config.pools.get(pool.name)
                if pool.kv_events is not None:
                    kept = {e.key for e in now.endpoints} if now is not None and now.kv_events is not None else set()
                    for gone in {e.key for e in pool.endpoints} - kept:
                        await self._store.drop_kv_endpoint(pool.name, gone)
        except RedisError as exc:
            log.warning("cannot prune load samples: %s", exc)

    async def _scrape(self, session: aiohttp.ClientSession, endpoint: Endpoint, runtime: Runtime) -> LoadSample:
        now_ms = self._clock.now_ms()  # Redis's clock: pickers judge the sample's age by it
        started = time.perf_counter()
        try:
            if runtime is Runtime.LLAMA_CPP:  # both at once, so the sample's figures are of one moment
                text, slots = await asyncio.gather(_get_text(session, endpoint, "/metrics"),
                                                   _get_slots(session, endpoint))
            else:
                text, slots = await _get_text(session, endpoint, "/metrics"), None
            previous = self._last.get(endpoint.key)
            sample = with_prefill_rate(with_batch_limit(to_load_sample(text, now_ms, slots), previous), previous,
                                       self._prefill_history.setdefault(endpoint.key, deque()))
            self._metrics.scrapes.labels("ok").inc()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:  # ValueError: garbled text or JSON
            self._metrics.scrapes.labels("failed").inc()
            self._metrics.failures.labels(_reason(exc)).inc()
            previous = self._last.get(endpoint.key) or LoadSample(scraped_at_ms=0, ok=False)
            sample = replace(previous, ok=False, consecutive_failures=previous.consecutive_failures + 1,
                             error=str(exc) or type(exc).__name__)
            if previous.ok:
                log.warning("scrape of %s (%s) failed: %s", endpoint.name, endpoint.key, sample.error)
        finally:
            self._metrics.scrape_seconds.observe(time.perf_counter() - started)
        return sample


async def _get_text(session: aiohttp.ClientSession, endpoint: Endpoint, path: str) -> str:
    async with session.get(f"http://{endpoint.key}{path}") as response:
        if response.status != 200:
            raise GarbledMetrics(f"HTTP {response.status}")
        return await response.text(errors="replace")


async def _get_slots(session: aiohttp.ClientSession, endpoint: Endpoint) -> list[dict[str, Any]] | None:
    """llama.cpp's /slots, or None where the server does not serve it (`--no-slots`): then its sample
    leaves out what only the slots tell (LoadSample.unreported)."""
    async with session.get(f"http://{endpoint.key}/slots") as response:
        if response.status != 200:
            return None
        slots = await response.json(content_type=None)
    if not isinstance(slots, list) or not all(isinstance(slot, dict) for slot in slots):
        raise GarbledMetrics("/slots is not a list of slots")
    return slots


async def _round(what: str, work: Awaitable[None]) -> None:
    """One round of a loop: a fault in it is logged and the next round tries again, so a Redis client that
    fails in an unexpected way (redis-py's cluster client raised AttributeError while a node restarted)
    never stops the collector."""
    try:
        await work
    except Exception:  # noqa: BLE001 (the loop's guard: see above)
        log.exception("%s round failed; the next one tries again", what)


# How long a server's batch limit is trusted after it was seen: a limit the cache imposed passes as
# sequences end, and a wrong one must not hold a pool back for longer than a few scrapes.
BATCH_LIMIT_KEEP_MS = 3000


def with_batch_limit(sample: LoadSample, previous: LoadSample | None) -> LoadSample:
    """The sample with the batch its server was last seen full at: its running count now if requests
    wait there for a batch slot (not a LoRA slot); else the last one known, for a few seconds, unless
    it now runs more than that. A limit the server reports itself (llama.cpp's slots) stands."""
    if sample.batch_limit > 0:
        return sample
    if sample.waiting > 0 and not sample.waiting_adapters:
        return replace(sample, batch_limit=sample.running, batch_limit_at_ms=sample.scraped_at_ms)
    if (previous is None or not previous.batch_limit or sample.running > previous.batch_limit
            or sample.scraped_at_ms - previous.batch_limit_at_ms > BATCH_LIMIT_KEEP_MS):
        return replace(sample, batch_limit=0.0, batch_limit_at_ms=0)
    return replace(sample, batch_limit=previous.batch_limit, batch_limit_at_ms=previous.batch_limit_at_ms)


# A server's prefill speed is measured over this long: long enough that the prompts it counts at once
# (a step takes up to its token budget, 8,192 tokens by default) are a small part of what it computes
# (over 2 s windows, a simulated server at a tenth of an H100's speed measured 1.9 times its speed),
# short enough that a few seconds of cold prompts show it.
PREFILL_WINDOW_MS = 8000


def with_prefill_rate(sample: LoadSample, previous: LoadSample | None,
                      history: deque[tuple[int, float]]) -> LoadSample:
    """The sample with the fastest its server was seen computing uncached prompt tokens since it started.

    No metric of vLLM or SGLang says how fast a server prefills, but its prompt and prefix-cache-hit
    counters say how many uncached prompt tokens it computed. Over a window in which it was busy that
    is its speed; over one in which it idled, less. So the highest rate over any window is the best
    estimate, and it only grows until the server restarts (its prompt counter falls) and measuring
    starts over. `history` holds this endpoint's recent counter readings; updated here.
    """
    now, uncached = sample.scraped_at_ms, sample.prompt_tokens - sample.cached_prompt_tokens
    if previous is None or not previous.prefill_rate_at_ms or sample.prompt_tokens < previous.prompt_tokens:
        history.clear()
        rate, since = 0.0, now
    else:
        rate, since = previous.prefill_tokens_per_s, previous.prefill_rate_at_ms
    history.append((now, uncached))
    while len(history) > 1 and now - history[1][0] >= PREFILL_WINDOW_MS:
        history.popleft()
    oldest_ms, oldest = history[0]
    if now - oldest_ms >= PREFILL_WINDOW_MS:
        rate = max(rate, (uncached - oldest) * 1000 / (now - oldest_ms))
    return replace(sample, prefill_tokens_per_s=rate, prefill_rate_at_ms=since)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientError):
        return "connect"
    if isinstance(exc, GarbledMetrics) and str(exc).startswith("HTTP "):
        return "http_status"
    return "garbled"
