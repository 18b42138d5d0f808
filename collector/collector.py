"""The scrape loop: every endpoint of every pool, concurrently, each interval."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace

import aiohttp
from redis.exceptions import RedisError

from collector.metrics_map import GarbledMetrics, to_load_sample
from gateway_state.lifecycle import every
from gateway_state.records import Config, Endpoint, LoadSample
from gateway_state.store import StateStore

log = logging.getLogger("collector")


@dataclass(frozen=True)
class CollectorSettings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Upstream pickers refresh metrics every 50 ms; 100 ms halves the scrape work
    # and is still far shorter than the time a queue takes to build.
    scrape_interval_ms: int = 100
    # A pod that cannot answer /metrics in this time is treated as failing.
    scrape_timeout_ms: int = 1000
    # Endpoints change on pod churn, not per request: re-read the config each second.
    config_refresh_ms: int = 1000

    def __post_init__(self) -> None:
        if not 10 <= self.scrape_interval_ms <= 60_000:
            raise ValueError("scrape_interval_ms must be between 10 and 60000")
        if self.scrape_timeout_ms <= 0 or self.config_refresh_ms <= 0:
            raise ValueError("scrape_timeout_ms and config_refresh_ms must be positive")


class Collector:
    def __init__(self, store: StateStore, settings: CollectorSettings) -> None:
        self._store = store
        self._settings = settings
        self._config: Config | None = None
        self._config_read_at = 0.0
        self._last: dict[str, LoadSample] = {}  # endpoint -> last sample, to carry figures over failures

    async def run(self, stop: asyncio.Event) -> None:
        timeout = aiohttp.ClientTimeout(total=self._settings.scrape_timeout_ms / 1000)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await every(self._settings.scrape_interval_ms / 1000, stop, lambda: self.scrape_once(session))

    async def scrape_once(self, session: aiohttp.ClientSession) -> None:
        config = await self._current_config()
        if config is None:
            return
        pools = [(pool.name, pool.endpoints) for pool in config.pools.values()]
        results = await asyncio.gather(*(self._scrape_pool(session, eps) for _, eps in pools))
        for (name, endpoints), samples in zip(pools, results, strict=True):
            try:
                await self._store.write_load(name, samples)
                await self._store.prune_load(name, {e.key for e in endpoints})
            except RedisError as exc:
                log.warning("cannot publish load of pool %s: %s", name, exc)

    async def _current_config(self) -> Config | None:
        now = time.monotonic()
        if self._config is None or now - self._config_read_at >= self._settings.config_refresh_ms / 1000:
            try:
                config = await self._store.read_config()
            except (RedisError, ValueError) as exc:
                log.warning("cannot read config, keeping the last one: %s", exc)
                return self._config
            if config is not None:  # none: Redis lost it; keep scraping what we knew
                self._config = config
            self._config_read_at = now
        return self._config

    async def _scrape_pool(self, session: aiohttp.ClientSession,
                           endpoints: tuple[Endpoint, ...]) -> dict[str, LoadSample]:
        samples = await asyncio.gather(*(self._scrape(session, e) for e in endpoints))
        return {e.key: s for e, s in zip(endpoints, samples, strict=True)}

    async def _scrape(self, session: aiohttp.ClientSession, endpoint: Endpoint) -> LoadSample:
        now_ms = int(time.time() * 1000)
        try:
            async with session.get(f"http://{endpoint.key}/metrics") as response:
                if response.status != 200:
                    raise GarbledMetrics(f"HTTP {response.status}")
                text = await response.text(errors="replace")
            sample = to_load_sample(text, now_ms)
        except (aiohttp.ClientError, TimeoutError, GarbledMetrics, UnicodeDecodeError) as exc:
            previous = self._last.get(endpoint.key) or LoadSample(scraped_at_ms=0, ok=False)
            sample = replace(previous, ok=False, consecutive_failures=previous.consecutive_failures + 1,
                             error=str(exc) or type(exc).__name__)
            if previous.ok:
                log.warning("scrape of %s (%s) failed: %s", endpoint.name, endpoint.key, sample.error)
        self._last[endpoint.key] = sample
        return sample
