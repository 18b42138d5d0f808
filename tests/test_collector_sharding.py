"""Collectors share the scrape work: one scraper per endpoint, and a killed collector's endpoints move on."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from redis.asyncio import Redis

from gateway_state import keys
from gateway_state.records import Config, Endpoint, Pool
from gateway_state.sharding import owned, owner
from gateway_state.store import StateStore
from simulator.metrics import VLLMMetrics
from simulator.physics import Physics
from tests.client import wait_for
from tests.conftest import BIN, free_port, publish

ENDPOINTS = 12


def test_rendezvous_moves_only_the_leavers_endpoints() -> None:
    endpoints = [f"10.0.0.{i}:8000" for i in range(200)]
    members = ["a", "b", "c"]
    shares = [owned(endpoints, members, m) for m in members]
    assert sum(len(s) for s in shares) == 200 and set().union(*shares) == set(endpoints)
    assert min(len(s) for s in shares) > 40
    after = {e: owner(e, ["a", "c"]) for e in endpoints}
    assert all(after[e] == owner(e, members) for e in endpoints if owner(e, members) != "b")
    assert owned(endpoints, [], "a") == set(endpoints)  # membership unknown: scrape everything


@pytest.fixture
async def scrape_log() -> AsyncIterator[tuple[list[Endpoint], dict[str, list[tuple[str, float]]]]]:
    """Endpoints answering vLLM metrics, recording which collector scraped them and when."""
    hits: dict[str, list[tuple[str, float]]] = defaultdict(list)
    text = VLLMMetrics("m", Physics(), 4).render()
    port = free_port()

    async def metrics(request: web.Request) -> web.Response:
        collector = request.headers.get("User-Agent", "").rsplit("/", 1)[-1]
        hits[f"{request.url.host}:{port}"].append((collector, time.monotonic()))
        return web.Response(body=text, headers={"Content-Type": "text/plain; version=0.0.4"})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    endpoints = [Endpoint(f"pod-{i}", f"127.0.5.{i + 1}", port) for i in range(ENDPOINTS)]
    for e in endpoints:
        await web.TCPSite(runner, e.address, port).start()
    yield endpoints, hits
    await runner.cleanup()


def scrapers_since(hits: dict[str, list[tuple[str, float]]], since: float) -> dict[str, set[str]]:
    return {endpoint: {c for c, t in rows if t >= since} for endpoint, rows in hits.items()}


async def test_one_scraper_per_endpoint_and_takeover_after_a_kill(redis_client: Redis, redis_url: str,
                                                                  scrape_log) -> None:  # type: ignore[no-untyped-def]
    endpoints, hits = scrape_log
    await publish(StateStore(redis_client), Config(1, {"p": Pool("p", (8000,), endpoints=tuple(endpoints))}, {}))
    procs = {f"c{i}": subprocess.Popen([str(BIN / "collector"), "--redis-url", redis_url, "--collector-id", f"c{i}",
                                        "--scrape-interval-ms", "50"], stderr=subprocess.DEVNULL)
             for i in range(3)}
    try:
        owners = {e.key: {owner(e.key, list(procs))} for e in endpoints}

        async def converged() -> bool:  # all three members, and each endpoint scraped by its owner alone
            members = sorted(m.decode() for m in await redis_client.zrange(keys.COLLECTORS, 0, -1))
            return members == sorted(procs) and scrapers_since(hits, time.monotonic() - 0.5) == owners

        await wait_for(converged, 10.0)
        window = time.monotonic()
        await asyncio.sleep(1.0)  # a window of steady state: ten scrape intervals
        steady = scrapers_since(hits, window)
        # Exactly one scraper per endpoint: its rendezvous owner among the three.
        assert owners == steady, steady
        share = {c: [e for e, cs in steady.items() if c in cs] for c in procs}
        victim = max(share, key=lambda c: len(share[c]))

        procs[victim].send_signal(signal.SIGKILL)
        procs[victim].wait(5)
        killed_at = time.monotonic()
        orphans = share[victim]
        taken_over: dict[str, float] = {}
        while len(taken_over) < len(orphans) and time.monotonic() - killed_at < 6:
            for e in orphans:
                later = [t for c, t in hits[e] if c != victim and t > killed_at]
                if later and e not in taken_over:
                    taken_over[e] = min(later) - killed_at
            await asyncio.sleep(0.05)
        print(f"\nendpoints per collector {({c: len(s) for c, s in share.items()})}; "
              f"{victim}'s {len(orphans)} endpoints taken over after {max(taken_over.values()):.2f} s")
        assert set(taken_over) == set(orphans)
        assert max(taken_over.values()) < 3.0
        after = scrapers_since(hits, time.monotonic() - 0.5)
        assert all(len(after[e.key]) == 1 for e in endpoints), after
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
