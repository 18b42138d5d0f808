"""Alerting rules and the dashboard: promtool checks and unit-tests the rules; every dashboard query parses
and names only metrics the running fleet's processes export (scraped live); label sets stay bounded."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

from local_fleet.fleet import Fleet
from tests.client import chat, post
from tests.conftest import FIXTURES, PREFIX_PORT

FILES = Path(__file__).parent.parent / "charts" / "inference-picker-fleet" / "files"
RULES, DASHBOARD = FILES / "alerting-rules.yaml", FILES / "grafana-dashboard.json"
METRIC = re.compile(r"\b((?:picker|collector|controller|inference)_[a-z0-9_]+)\b")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool, "promtool is not installed (Debian package prometheus)"
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120)


def test_the_alerting_rules_pass_their_unit_tests() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", str(FIXTURES / "alerting-rules.test.yaml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    for rule in rules:
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    runbook = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    missing = [r["alert"] for r in rules if f"### {r['alert']}" not in runbook]
    assert not missing, f"no runbook section for {missing}"


def dashboard_queries() -> list[str]:
    return [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    # promtool parses PromQL when it checks rules: each query becomes a recording rule.
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query_{i}", "expr": expr}
                                                        for i, expr in enumerate(dashboard_queries())]}]}
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(rules))
    checked = promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.read().decode()


async def test_the_dashboard_and_the_rules_name_only_exported_metrics(fleet: Fleet) -> None:
    if fleet.settings.redis_cluster_ports:
        pytest.skip("the same processes export the same names on either Redis")
    import aiohttp

    async with aiohttp.ClientSession() as http:  # traffic, so every counter has a series
        for name in ("round1.txt", "round2.txt"):
            assert (await post(http, PREFIX_PORT, None, raw=(FIXTURES / name).read_bytes())).status == 200
        assert (await post(http, PREFIX_PORT, chat("hello", model="no-such-model"))).status == 404
    s = fleet.settings
    texts = [scrape(p) for p in (*s.picker_metrics_ports, *s.collector_metrics_ports, *s.controller_metrics_ports)]
    exported = {line.split("{")[0].split(" ")[0] for text in texts for line in text.splitlines()
                if line and not line.startswith("#")}
    # A labelled family with no series yet (flow control's, before any pool saturates) is still declared.
    suffixes = {"counter": ("", "_total"), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    exported |= {name + suffix for text in texts for line in text.splitlines() if line.startswith("# TYPE ")
                 for name, kind in [line.split()[2:4]] for suffix in suffixes.get(kind, ("",))}
    wanted = {m for expr in dashboard_queries() for m in METRIC.findall(expr)}
    wanted |= {m for r in yaml.safe_load(RULES.read_text())["groups"][0]["rules"] for m in METRIC.findall(r["expr"])}
    missing = sorted(m for m in wanted if m not in exported)
    assert not missing, f"queries name metrics no process exports: {missing}"
    # Bounded labels: a model the pool does not list never becomes a label value.
    assert "no-such-model" not in "".join(texts)
