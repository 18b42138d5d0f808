"""The admin API against the running fleet: /explain predicts the next real decision, drains take effect
within a snapshot refresh while running streams finish, tokens and scopes hold, no prompt text leaks into
any answer or into Redis, and the status page renders every pod in a real headless browser."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from local_fleet.fleet import Fleet
from tests.client import chat, post
from tests.conftest import FIXTURES, PREFIX_PORT

POOL = "default/prefix-pool"
PREFIX_PODS = {f"prefix-{i}" for i in range(4)}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


def admin_url(fleet: Fleet, index: int = 0) -> str:
    return f"http://127.0.0.1:{fleet.settings.picker_admin_ports[index]}"


def auth(fleet: Fleet, scope: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {fleet.admin_tokens[scope]}"}


async def explain(http: aiohttp.ClientSession, fleet: Fleet, body: bytes, index: int = 0) -> dict:
    async with http.post(f"{admin_url(fleet, index)}/admin/explain", params={"pool": POOL}, data=body,
                         headers=auth(fleet, "read")) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def test_explain_names_the_pod_the_next_request_gets(http: aiohttp.ClientSession, fleet: Fleet) -> None:
    round1, round2 = (FIXTURES / "round1.txt").read_bytes(), (FIXTURES / "round2.txt").read_bytes()
    first = await post(http, PREFIX_PORT, None, raw=round1)
    assert first.status == 200
    await asyncio.sleep(0.2)  # the index write follows the answer
    for index in (0, 1):  # every replica explains the same decision, from the shared index
        explained = await explain(http, fleet, round2, index)
        assert explained["pick_name"] == first.pod
        assert explained["matched_blocks"][explained["pick"]] > 0, index
    served = await post(http, PREFIX_PORT, None, raw=round2)
    assert served.pod == explained["pick_name"]
    # The figures are the scheduler's: each total is the sum of the weighted scores, and the pick leads.
    for endpoint, total in explained["totals"].items():
        assert total == pytest.approx(sum(s["weighted"][endpoint] for s in explained["scorers"]))
    assert explained["totals"][explained["pick"]] == max(explained["totals"].values())
    assert explained["matched_blocks"][explained["pick"]] > 0 and explained["prompt_blocks"] > 0
    assert [f["name"] for f in explained["filters"]][0] == "drain"
    print(json.dumps(explained, indent=1))


async def test_a_drained_pod_gets_no_new_requests_and_finishes_its_stream(http: aiohttp.ClientSession,
                                                                          fleet: Fleet) -> None:
    body = chat("drain me " + uuid.uuid4().hex + " tell me a long story " * 10, max_tokens=150, stream=True)
    target = await explain(http, fleet, json.dumps(body).encode())
    url = f"{admin_url(fleet)}/admin/pools/default/prefix-pool/endpoints/{target['pick']}/drain"
    stream = asyncio.create_task(post(http, PREFIX_PORT, body))
    await asyncio.sleep(0.3)  # the stream is running on the pod
    async with http.post(url, headers=auth(fleet, "admin")) as r:
        assert r.status == 204
    try:
        await asyncio.sleep(0.1)  # one snapshot refresh (50 ms), with margin
        replies = await asyncio.gather(*(post(http, PREFIX_PORT, chat(f"after the drain {i} {uuid.uuid4().hex}"))
                                         for i in range(16)))
        assert all(r.status == 200 for r in replies)
        assert target["pick_name"] not in {r.pod for r in replies}
        finished = await stream
        assert finished.status == 200 and finished.pod == target["pick_name"]
        assert finished.text.rstrip().endswith("data: [DONE]")
        async with http.get(f"{admin_url(fleet)}/admin/pools", headers=auth(fleet, "read")) as r:
            pools = {p["pool"]: p for p in await r.json()}
        assert [e["drained"] for e in pools[POOL]["endpoints"] if e["endpoint"] == target["pick"]] == [True]
    finally:
        async with http.delete(url, headers=auth(fleet, "admin")) as r:
            assert r.status == 204
    await asyncio.sleep(0.1)
    again = await explain(http, fleet, json.dumps(body).encode())
    assert target["pick"] in again["candidates"] and not again["filters"][0]["removed"]


async def test_tokens_and_scopes(http: aiohttp.ClientSession, fleet: Fleet) -> None:
    base = admin_url(fleet)
    for headers in ({}, {"Authorization": "Bearer not-a-token"}):
        async with http.get(f"{base}/admin/pools", headers=headers) as r:
            assert r.status == 401
    endpoint = f"{base}/admin/pools/default/prefix-pool/endpoints/{next(iter(fleet.pods()))}/drain"
    async with http.post(endpoint, headers=auth(fleet, "read")) as r:
        assert r.status == 403
    for path in ("/admin/pools", "/admin/fleet", "/admin/models", "/admin/pools/default/prefix-pool/prefix"):
        async with http.get(base + path, headers=auth(fleet, "read")) as r:
            assert r.status == 200, path
    async with http.get(f"{base}/openapi.json") as r:
        assert r.status == 200 and "/admin/explain" in (await r.json())["paths"]


async def test_no_prompt_text_in_any_answer_or_in_redis(http: aiohttp.ClientSession, fleet: Fleet) -> None:
    marker = f"MARKER-{uuid.uuid4().hex}"
    body = chat(f"{marker} is my secret, and {marker} again " * 5)
    assert (await post(http, PREFIX_PORT, body)).status == 200
    await explain(http, fleet, json.dumps(body).encode())
    await asyncio.sleep(1.5)  # a heartbeat flushes the hit counts
    texts = []
    for path in ("/admin/pools", "/admin/fleet", "/admin/models", "/admin/pools/default/prefix-pool/prefix"):
        async with http.get(admin_url(fleet) + path, headers=auth(fleet, "read")) as r:
            texts.append(await r.text())
    async with http.post(f"{admin_url(fleet)}/admin/explain", params={"pool": POOL}, json=body,
                         headers=auth(fleet, "read")) as r:
        texts.append(await r.text())
    assert not any(marker in t for t in texts)
    redis = Redis.from_url(fleet.redis_url) if not fleet.settings.redis_cluster_ports else None
    if redis is None:
        pytest.skip("the dump walks one Redis; the cluster run checks the same keys")
    dumped = 0
    async for key in redis.scan_iter(count=1000):
        assert marker.encode() not in key
        kind = (await redis.type(key)).decode()
        value = {"string": redis.get, "hash": redis.hgetall, "zset": lambda k: redis.zrange(k, 0, -1),
                 "set": redis.smembers, "list": lambda k: redis.lrange(k, 0, -1)}[kind](key)
        assert marker.encode() not in repr(await value).encode()
        dumped += 1
    await redis.aclose()
    assert dumped > 10


async def test_the_status_page_renders_every_pod_in_a_headless_browser(fleet: Fleet, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is not installed"
    url = f"{admin_url(fleet)}/?token={fleet.admin_tokens['read']}"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=8000",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    rows = {line.split('data-pod="')[1].split('"')[0] for line in dom.split("<tr")[1:] if 'data-pod="' in line}
    assert {name for name, _ in fleet.pods().values()} >= rows >= PREFIX_PODS, dom[-2000:]
    assert "default/prefix-pool" in dom and "config generation" in dom
    # The screenshot in the docs is this one: STATUS_PAGE_SCREENSHOT=docs/status-page.png refreshes it.
    shot = Path(os.environ.get("STATUS_PAGE_SCREENSHOT") or tmp_path / "status-page.png").resolve()
    subprocess.run([*flags, "--window-size=1280,900", f"--screenshot={shot}", url], capture_output=True,
                   timeout=120, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
