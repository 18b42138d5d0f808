"""Requests served without a picker's decision: counted from the real Envoy's ext_proc counters, shown on the
admin API and the status page, alerted on; and no such request while the fleet starts.

The fleet here is its own (both pickers are stopped under traffic), with a short bypass window so that a
restart clears the figures within the test, and Envoy's platform listener, through which its collector
reads the counters as the chart's collectors do.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from collector.gateway_stats import BypassWindow, GatewayTarget, ext_proc_counters, resolve_instances
from local_fleet.fleet import Fleet, FleetSettings
from tests.client import chat, wait_for
from tests.conftest import FIXTURES, free_port, own_net, prefix_pool_manifests
from tests.test_make_up import MakeUp
from tests.test_monitoring import RULES, promtool

POOL = "default/prefix-pool"
# Its own pods' network: not the suite fleet's, nor the chaos fleet's (140 and up); the PD
# simulator test's 127.120-139.0.x stays apart by its third octet.
NET = own_net(120, 140)
WINDOW_MS = 15_000


def test_ext_proc_counters_map_each_series_to_its_pool() -> None:
    # Our Envoy tags each pool's filter with the pool; Envoy Gateway's share one set per listener.
    text = "\n".join([
        '# TYPE envoy_http_ext_proc_streams_started counter',
        'envoy_http_ext_proc_streams_started{envoy_http_conn_manager_prefix="gw_http",inference_pool="ns/a.b"} 7',
        'envoy_http_ext_proc_failure_mode_allowed{envoy_http_conn_manager_prefix="gw_http",inference_pool="ns/a.b"} 3',
        'envoy_http_ext_proc_streams_started{envoy_http_conn_manager_prefix="http-10080"} 10',
        'envoy_http_ext_proc_failure_mode_allowed{envoy_http_conn_manager_prefix="http-10080"} 0',
        'envoy_http_ext_proc_streams_started{envoy_http_conn_manager_prefix="http-10443"} 5',  # mapped to no pool
        'envoy_http_ext_proc_streams_failed{envoy_http_conn_manager_prefix="gw_http",inference_pool="ns/a.b"} 3',
    ])
    target = GatewayTarget.parse("eg=http://10.0.0.7:19001/stats/prometheus,http-10080=ns/eg-pool")
    assert target.listeners == {"http-10080": "ns/eg-pool"}
    assert ext_proc_counters(text, target.listeners) == {"ns/a.b": (10, 3), "ns/eg-pool": (10, 0)}
    for bad in ("eg", "=http://x/", "eg=ftp://x/", "eg=http://x/,http-1"):
        with pytest.raises(ValueError):
            GatewayTarget.parse(bad)


async def test_a_target_named_by_host_stands_for_every_address_it_resolves_to() -> None:
    # A headless Service's name resolves to each gateway replica; here the machine's own resolver.
    named = GatewayTarget.parse("gw=http://localhost:9902/stats/prometheus?filter=ext_proc")
    found = await resolve_instances(named)
    assert ("gw/127.0.0.1", "http://127.0.0.1:9902/stats/prometheus?filter=ext_proc", named) in found
    literal = GatewayTarget.parse("gw=http://127.0.0.1:9902/stats/prometheus")
    assert await resolve_instances(literal) == [("gw", literal.url, literal)]


def test_the_bypass_window_covers_the_last_window_and_starts_over_when_the_gateway_restarts() -> None:
    window = BypassWindow(10_000)
    assert window.observe(0, {"p": (100, 40)})["p"].requests == 0  # what came before is in no window
    assert window.observe(5_000, {"p": (150, 40)})["p"].requests == 50
    assert window.observe(10_000, {"p": (200, 50)})["p"].bypassed == 10
    late = window.observe(16_000, {"p": (260, 80)})["p"]
    assert (late.window_ms, late.requests, late.bypassed, late.ratio) == (11_000, 110, 40, 40 / 110)
    restarted = window.observe(17_000, {"p": (5, 5)})["p"]  # the counters fell: a new Envoy
    assert (restarted.requests, restarted.bypassed, restarted.requests_total) == (0, 0, 5)
    assert window.observe(18_000, {"p": (9, 8)})["p"].bypassed == 3
    assert window.observe(19_000, {}) == {}


@pytest.fixture(scope="module")
def bypass_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    port = free_port()
    manifests = prefix_pool_manifests(tmp_path_factory.mktemp("bypass-manifests"), port, NET)
    settings = FleetSettings(
        manifests_dir=manifests, work_dir=tmp_path_factory.mktemp("bypass-fleet"), redis_port=free_port(),
        picker_ports=(free_port(), free_port()), picker_metrics_ports=(free_port(), free_port()),
        picker_admin_ports=(free_port(), free_port()), collector_metrics_ports=(free_port(),),
        envoy_admin_port=free_port(), envoy_health_port=free_port(), resync_interval_ms=300,
        collector_args=("--gateway-scrape-interval-ms", "200", "--bypass-window-ms", str(WINDOW_MS)),
        simulator_args=("--time-scale", "0.1"))
    fleet = Fleet(settings)
    fleet.listen_port = port  # type: ignore[attr-defined]
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.stop()


def _get(url: str, token: str = "") -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""  # not listening (yet)


def _collector_counters(fleet: Fleet) -> tuple[float, float]:
    """(requests, bypassed) of the pool as the collector exports them."""
    _, text = _get(f"http://127.0.0.1:{fleet.settings.collector_metrics_ports[0]}/metrics")
    figures = {}
    for line in text.decode().splitlines():
        for name in ("inference_pool_gateway_requests_total", "inference_pool_bypassed_requests_total"):
            if line.startswith(name + "{") and f'pool="{POOL}"' in line:
                figures[name] = float(line.rsplit(" ", 1)[1])
    return (figures.get("inference_pool_gateway_requests_total", 0.0),
            figures.get("inference_pool_bypassed_requests_total", 0.0))


def _pool_bypass(fleet: Fleet) -> dict[str, object] | None:
    status, body = _get(f"http://127.0.0.1:{fleet.settings.picker_admin_ports[1]}/admin/pools",
                        fleet.admin_tokens["read"])
    assert status == 200, body
    return next(p["bypass"] for p in json.loads(body) if p["pool"] == POOL)


def _status_page_line(fleet: Fleet, tmp_path: Path) -> str:
    """The bypass line the status page shows for the pool, rendered by a real browser."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is not installed"
    url = f"http://127.0.0.1:{fleet.settings.picker_admin_ports[1]}/?token={fleet.admin_tokens['read']}"
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120).stdout
    found = [chunk for chunk in dom.split("<p ")[1:] if f'data-pool="{POOL}"' in chunk.split(">")[0]]
    assert found, dom[-2000:]
    return found[0].split("</p>")[0]


async def test_stopped_pickers_show_as_bypass_until_they_return(bypass_fleet: Fleet, tmp_path: Path) -> None:
    fleet, port = bypass_fleet, bypass_fleet.listen_port  # type: ignore[attr-defined]
    health = f"http://127.0.0.1:{fleet.settings.envoy_health_port}"
    recorded: list[tuple[float, float]] = []  # the collector's counters, every half second

    async def record() -> None:
        while True:
            recorded.append(await asyncio.to_thread(_collector_counters, fleet))
            await asyncio.sleep(0.5)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
        async def traffic(seconds: float) -> list[int]:
            statuses: list[int] = []
            until = time.monotonic() + seconds
            while time.monotonic() < until:
                async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                     json=chat(f"hello {len(statuses)}", max_tokens=2)) as r:
                    await r.read()
                    statuses.append(r.status)
                await asyncio.sleep(0.05)
            return statuses

        assert _get(health + "/ready")[0] == 200 and _get(health + "/live") == (200, b"LIVE\n")
        assert _get(health + "/clusters")[0] == 404  # the platform listener is not the admin port
        recording = asyncio.create_task(record())
        healthy = await traffic(3.0)
        await wait_for(lambda: _collector_counters(fleet)[0] >= len(healthy), 5.0)
        assert _collector_counters(fleet)[1] == 0
        assert (_pool_bypass(fleet) or {}).get("bypassed") == 0
        assert 'data-bypassed="no"' in _status_page_line(fleet, tmp_path)

        fleet.kill("picker-0")
        fleet.kill("picker-1")
        # Traffic until the collector's counter has risen in four of the readings (the alert's test below
        # replays one reading a minute and needs its 3 minutes); a slow machine scrapes less often.
        bypassed: list[int] = []
        until = time.monotonic() + 30.0
        while not bypassed or (_rises(recorded) < 4 and time.monotonic() < until):
            bypassed += await traffic(1.0)
        # A FailOpen pool keeps answering, round robin: every request bypassed the pickers.
        assert bypassed and set(bypassed) == {200}, bypassed
        await wait_for(lambda: _collector_counters(fleet)[1] >= len(bypassed) - 2, 5.0)
        assert _get(health + "/ready")[0] == 503  # the gateway pod's startup probe would hold it back
        assert _get(health + "/live")[0] == 200  # its readiness would not: the failure mode applies

        fleet.restart("picker-1")  # a replica to read the admin API from
        admin = f"http://127.0.0.1:{fleet.settings.picker_admin_ports[1]}/docs"
        await wait_for(lambda: _get(admin)[0] == 200, 30.0)
        view = _pool_bypass(fleet)
        # The window holds healthy requests too; the bypassed ones are those sent while the pickers were down.
        assert view is not None and view["bypassed"] >= len(bypassed) - 2, view  # type: ignore[operator]
        line = _status_page_line(fleet, tmp_path)
        assert 'data-bypassed="yes"' in line and "PICKERS BYPASSED" in line, line

        fleet.restart("picker-0")
        fleet.wait_pickers_routable(30.0)
        before = _collector_counters(fleet)[1]
        routed = await traffic(WINDOW_MS / 1000 + 2.0)
        assert set(routed) == {200}
        assert _collector_counters(fleet)[1] == before  # no more bypass once the pickers are back
        await wait_for(lambda: (_pool_bypass(fleet) or {}).get("bypassed") == 0, 10.0)
        assert 'data-bypassed="no"' in _status_page_line(fleet, tmp_path)
        assert _get(health + "/ready")[0] == 200
        recording.cancel()

    _alert_fires_on(recorded, tmp_path)


def _rises(recorded: list[tuple[float, float]]) -> int:
    """In how many readings the bypassed count went up."""
    return sum(1 for i in range(1, len(recorded)) if recorded[i][1] > recorded[i - 1][1])


def _alert_fires_on(recorded: list[tuple[float, float]], tmp_path: Path) -> None:
    """promtool's unit test of PickerBypassed on the counters recorded above, replayed one reading a minute:
    silent before the pickers stopped, firing for the pool while they were down, resolved after."""
    first_bypass = next(i for i, (_, b) in enumerate(recorded) if b > 0)
    last_bypass = max(i for i in range(1, len(recorded)) if recorded[i][1] > recorded[i - 1][1])
    # Enough readings for the alert's 3 minutes, and for its 5-minute rate to forget the outage after.
    assert first_bypass >= 2 and last_bypass - first_bypass >= 3 and len(recorded) > last_bypass + 6, recorded
    rules = yaml.safe_load(RULES.read_text())
    for rule in rules["groups"][0]["rules"]:
        rule.pop("annotations")  # they hold the ratio, humanized: the labels say which alert fired
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    labels = f'{{pool="{POOL}",gateway="envoy"}}'
    requests, bypassed = (" ".join(f"{reading[i]:g}" for reading in recorded) for i in (0, 1))
    test = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": f"inference_pool_gateway_requests_total{labels}", "values": requests},
                         {"series": f"inference_pool_bypassed_requests_total{labels}", "values": bypassed}],
        "alert_rule_test": [
            {"eval_time": f"{first_bypass - 1}m", "alertname": "PickerBypassed"},
            {"eval_time": f"{last_bypass}m", "alertname": "PickerBypassed",
             "exp_alerts": [{"exp_labels": {"severity": "critical", "pool": POOL}}]},
            {"eval_time": f"{len(recorded) - 1}m", "alertname": "PickerBypassed"}]}]}
    (tmp_path / "recorded.test.yaml").write_text(yaml.safe_dump(test))
    tested = promtool("test", "rules", str(tmp_path / "recorded.test.yaml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.05)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _envoy_fail_open_count(admin_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats?filter=ext_proc\\..*failure_mode_allowed",
                                timeout=5) as r:
        return sum(int(line.rsplit(":", 1)[1]) for line in r.read().decode().splitlines() if line.strip())


@pytest.mark.e2e
async def test_a_client_that_starts_at_envoys_first_answer_is_routed_by_a_picker(tmp_path: Path) -> None:
    """Ten fresh `make up`s; each time round1 then round2 the moment :8080 accepts a connection."""
    if shutil.which("make") is None:
        pytest.fail("make is not installed")
    rounds = [(FIXTURES / name).read_bytes() for name in ("round1.txt", "round2.txt")]
    timings = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        for attempt in range(10):
            (tmp_path / str(attempt)).mkdir()
            started = time.monotonic()
            make_up = MakeUp(tmp_path / str(attempt))
            try:
                while not _accepts(make_up.port):
                    assert time.monotonic() - started < 180, make_up.log_path.read_text()[-3000:]
                    assert make_up.proc.poll() is None, make_up.log_path.read_text()[-3000:]
                    await asyncio.sleep(0.005)
                accepted = time.monotonic()
                pods = []
                for body in rounds:
                    async with http.post(f"http://127.0.0.1:{make_up.port}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"}) as r:
                        await r.read()
                        assert r.status == 200, (attempt, r.status)
                        pods.append(r.headers.get("x-inference-pod"))
                timings.append((accepted - started, time.monotonic() - accepted))
                assert pods[0] is not None and pods[0] == pods[1], (attempt, pods)
                assert _envoy_fail_open_count(make_up.base + 5) == 0, attempt
            finally:
                make_up.stop()
    print("\nstart  first accept after  round1+round2 took")
    for i, (accept_s, rounds_s) in enumerate(timings):
        print(f"{i:5d} {accept_s:17.2f} s {rounds_s:16.3f} s")
