"""Requests a gateway served without a picker's decision, from the gateway's own Envoy counters.

When Envoy cannot reach a picker (none healthy yet, a network policy, a TLS mistake, a rollout), its
ext_proc filter's failure mode decides: a FailOpen pool is served round robin, with no affinity and no
flow control, and nothing of ours would see it. Envoy counts it, per filter:
`envoy_http_ext_proc_failure_mode_allowed` on its Prometheus page, beside `..._streams_started`.

Which pool a series belongs to:
- our own Envoy (the local fleet's, the chart's standalone gateway) runs one filter per pool, and its
  bootstrap tags the counters with the pool (`inference_pool="namespace/name"`);
- Envoy Gateway and Envoy AI Gateway name no pool in their ext_proc counters: the filters of one
  listener share them, tagged only `envoy_http_conn_manager_prefix` (`http-<port>`, `https-<port>`),
  so a target maps each such listener to its pool.

Requests are the streams the filter opened plus the requests it let through: a stream that opened and
then failed counts in both, so while streams break mid-way the ratio reads low, by at most half; when
no picker can be reached at all (the usual case) no stream opens and the ratio is exact.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
from redis.exceptions import RedisError

from collector.metrics import GatewayCounters
from gateway_state.load_store import LoadStore
from gateway_state.protocol import POOL_STATS_TAG
from gateway_state.records import BypassSample

log = logging.getLogger("collector")

STARTED, ALLOWED = "streams_started", "failure_mode_allowed"
LISTENER_TAG = "envoy_http_conn_manager_prefix"
_SERIES = re.compile(r"^envoy_http_ext_proc_(" + STARTED + "|" + ALLOWED + r")\{([^}]*)\}\s+(\S+)", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class GatewayTarget:
    """One gateway's Prometheus page (a host name stands for every address it resolves to: one per
    gateway replica, from a headless Service), and its listeners' pools where its counters name none."""

    name: str
    url: str
    listeners: Mapping[str, str] = field(default_factory=dict)  # listener stat prefix -> pool

    @classmethod
    def parse(cls, spec: str) -> GatewayTarget:
        """`NAME=URL[,LISTENER=POOL...]`, e.g. `eg=http://10.0.0.7:19001/stats/prometheus,http-10080=default/pool`."""
        name, _, rest = spec.partition("=")
        url, *pairs = rest.split(",")
        listeners = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
        if not name or urlsplit(url).scheme not in ("http", "https") or len(listeners) != len(pairs):
            raise ValueError(f"gateway stats target {spec!r} is not NAME=URL[,LISTENER=POOL...]")
        return cls(name, url, listeners)


def ext_proc_counters(text: str, listeners: Mapping[str, str]) -> dict[str, tuple[int, int]]:
    """pool -> (requests that reached its picker filter, of them served without a decision), summed over
    the page's listeners. Series of no known pool are left out."""
    out: dict[str, list[int]] = {}
    for counter, labels, value in _SERIES.findall(text):
        tags = dict(_LABEL.findall(labels))
        pool = tags.get(POOL_STATS_TAG) or listeners.get(tags.get(LISTENER_TAG, ""))
        if not pool:
            continue
        figures = out.setdefault(pool, [0, 0])
        n = int(float(value))
        figures[0] += n  # a request let through opened no stream, or one that then broke (see above)
        if counter == ALLOWED:
            figures[1] += n
    return {pool: (requests, bypassed) for pool, (requests, bypassed) in out.items()}


class BypassWindow:
    """Trailing-window figures of one gateway instance's counters, per pool. A counter that falls means a
    new gateway process: that pool's history starts over."""

    def __init__(self, window_ms: int) -> None:
        self._window_ms = window_ms
        self._history: dict[str, deque[tuple[int, int, int]]] = {}  # pool -> (ms, requests, bypassed)

    def observe(self, now_ms: int, counters: Mapping[str, tuple[int, int]]) -> dict[str, BypassSample]:
        self._history = {p: h for p, h in self._history.items() if p in counters}
        out = {}
        for pool, (requests, bypassed) in counters.items():
            history = self._history.setdefault(pool, deque())
            if history and (requests < history[-1][1] or bypassed < history[-1][2]):
                history.clear()
            history.append((now_ms, requests, bypassed))
            while len(history) > 1 and now_ms - history[1][0] >= self._window_ms:
                history.popleft()
            since, requests_then, bypassed_then = history[0]
            if len(history) == 1:  # the first reading: what the gateway did before is not in any window
                requests_then, bypassed_then = requests, bypassed
            out[pool] = BypassSample(now_ms, now_ms - since, requests - requests_then, bypassed - bypassed_then,
                                     requests, bypassed)
        return out


class GatewayScraper:
    """Reads the gateways' pages each round: the figures go to Redis (status page, admin API) and to this
    collector's /metrics (alerts). Each target is read by one collector, as each pod is."""

    def __init__(self, targets: Sequence[GatewayTarget], store: LoadStore, counters: GatewayCounters,
                 window_ms: int, keep_ms: int) -> None:
        self.targets = tuple(targets)
        self._store = store
        self._counters = counters
        self._window_ms = window_ms
        self._keep_ms = keep_ms
        self._windows: dict[str, BypassWindow] = {}  # gateway instance -> its window
        self._failing: set[str] = set()

    async def scrape_once(self, session: aiohttp.ClientSession, mine: set[str], now_ms: int) -> None:
        found = await asyncio.gather(*(resolve_instances(t) for t in self.targets if t.name in mine))
        instances = [i for listed in found for i in listed]
        texts = await asyncio.gather(*(self._fetch(session, name, url) for name, url, _ in instances))
        samples: dict[str, dict[str, BypassSample]] = {}
        readings: dict[tuple[str, str], tuple[int, int]] = {}
        for (name, _, target), text in zip(instances, texts, strict=True):
            if text is None:
                continue
            counters = ext_proc_counters(text, target.listeners)
            window = self._windows.setdefault(name, BypassWindow(self._window_ms))
            for pool, sample in window.observe(now_ms, counters).items():
                samples.setdefault(pool, {})[name] = sample
                readings[(pool, name)] = counters[pool]
        self._windows = {n: w for n, w in self._windows.items() if any(n == i[0] for i in instances)}
        self._counters.readings = readings
        if samples:
            try:
                await self._store.write_bypass(samples, self._keep_ms)
            except RedisError as exc:
                log.warning("cannot publish the gateways' bypass figures: %s", exc)

    async def _fetch(self, session: aiohttp.ClientSession, name: str, url: str) -> str | None:
        try:
            async with session.get(url) as response:
                if response.status != 200:
                    raise aiohttp.ClientResponseError(response.request_info, (), status=response.status)
                text = await response.text(errors="replace")
        except (aiohttp.ClientError, TimeoutError) as exc:
            if name not in self._failing:
                log.warning("cannot read gateway %s's counters at %s: %s", name, url, str(exc) or type(exc).__name__)
                self._failing.add(name)
            return None
        self._failing.discard(name)
        return text


async def resolve_instances(target: GatewayTarget) -> list[tuple[str, str, GatewayTarget]]:
    """(instance name, URL, target) for each address the target's host stands for: an IP is one instance;
    a name, every address it resolves to now (a headless Service lists each gateway replica)."""
    parts = urlsplit(target.url)
    host = parts.hostname or ""
    try:
        ipaddress.ip_address(host)
        return [(target.name, target.url, target)]
    except ValueError:
        pass
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        log.warning("cannot resolve gateway %s (%s): %s", target.name, host, exc)
        return []
    addresses = sorted({str(info[4][0]) for info in infos})
    netloc = parts.netloc.replace(host, "{}", 1)
    return [(f"{target.name}/{a}", parts._replace(netloc=netloc.format(f"[{a}]" if ":" in a else a)).geturl(), target)
            for a in addresses]
