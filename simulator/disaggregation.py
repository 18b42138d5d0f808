"""SGLang's prefill/decode disaggregation, as a simulated pod runs it.

Both sides get the same request, carrying `bootstrap_host`, `bootstrap_port` and
`bootstrap_room` (the router draws the room). The prefill pod computes the prompt
with its own prefix cache, then marks the room ready on its bootstrap server. The
decode pod asks that server for the room, waiting until the prefill finishes,
receives the KV cache (a transfer time that grows with the prompt), and only then
decodes: its first token waits for the hand-over. A room that does not become
ready within the bootstrap timeout, or whose prefill failed, fails the decode
request with a clear error, as SGLang's decode side aborts it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

BOOTSTRAP_FIELDS = ("bootstrap_host", "bootstrap_port", "bootstrap_room")
_ROOM_TTL_S = 120.0  # a finished room is kept this long for a decode request that is late


class TransferFailed(Exception):
    """The decode side got no KV cache for its room."""


@dataclass(frozen=True)
class Bootstrap:
    host: str
    port: int
    room: int


def bootstrap_of(body: dict[str, Any]) -> Bootstrap | None:
    """The request's bootstrap fields; None when it has none. ValueError names a malformed one."""
    present = [f for f in BOOTSTRAP_FIELDS if f in body]
    if not present:
        return None
    if len(present) != len(BOOTSTRAP_FIELDS):
        missing = [f for f in BOOTSTRAP_FIELDS if f not in body]
        raise ValueError(f"`{missing[0]}` is required with the other bootstrap fields.")
    host, port, room = body["bootstrap_host"], body["bootstrap_port"], body["bootstrap_room"]
    if not isinstance(host, str) or not host:
        raise ValueError("`bootstrap_host` must be a non-empty string.")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ValueError("`bootstrap_port` must be a port number.")
    if not isinstance(room, int) or isinstance(room, bool) or not 0 <= room < 2**64:
        raise ValueError("`bootstrap_room` must be a non-negative 64-bit integer.")
    return Bootstrap(host, port, room)


@dataclass
class _Room:
    done: asyncio.Event = field(default_factory=asyncio.Event)
    prompt_tokens: int = 0
    error: str = ""
    finished_at: float = 0.0


class BootstrapServer:
    """A prefill pod's bootstrap port: decode pods wait here for their room's KV cache."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._rooms: dict[int, _Room] = {}
        self.waiting_decodes = 0  # decode sides waiting on a room (SGLang's bootstrap queue)
        self.failed = 0

    def _room(self, room: int) -> _Room:
        now = time.monotonic()
        for key in [k for k, r in self._rooms.items() if r.done.is_set() and now - r.finished_at > _ROOM_TTL_S]:
            del self._rooms[key]
        return self._rooms.setdefault(room, _Room())

    def ready(self, room: int, prompt_tokens: int) -> None:
        r = self._room(room)
        r.prompt_tokens, r.finished_at = prompt_tokens, time.monotonic()
        r.done.set()

    def fail(self, room: int, reason: str) -> None:
        r = self._room(room)
        r.error, r.finished_at = reason, time.monotonic()
        self.failed += 1
        r.done.set()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/rooms/{room}", self._wait)
        return app

    async def _wait(self, request: web.Request) -> web.Response:
        try:
            room = int(request.match_info["room"])
        except ValueError:
            return web.json_response({"error": "the room must be an integer"}, status=400)
        r = self._room(room)
        self.waiting_decodes += 1
        try:
            async with asyncio.timeout(self._timeout_s):
                await r.done.wait()
        except TimeoutError:
            return web.json_response({"error": f"no prefill for room {room} within {self._timeout_s:g} s"},
                                     status=504)
        finally:
            self.waiting_decodes -= 1
        if r.error:
            return web.json_response({"error": r.error}, status=500)
        return web.json_response({"prompt_tokens": r.prompt_tokens})


class KVReceiver:
    """A decode pod's side of the hand-over."""

    def __init__(self, timeout_s: float, transfer_token_s: float, transfer_overhead_s: float,
                 time_scale: float) -> None:
        self._timeout_s = timeout_s
        self._per_token_s = transfer_token_s
        self._overhead_s = transfer_overhead_s
        self._time_scale = time_scale
        self._session: aiohttp.ClientSession | None = None
        self.transferring = 0  # decode requests waiting for their KV cache (SGLang's transfer queue)
        self.failed = 0
        self.last_latency_ms = 0.0

    async def receive(self, bootstrap: Bootstrap, prompt_tokens: int) -> None:
        """Return once the prompt's KV cache has arrived; TransferFailed otherwise."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        url = f"http://{bootstrap.host}:{bootstrap.port}/rooms/{bootstrap.room}"
        self.transferring += 1
        started = time.monotonic()
        try:
            try:
                async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=self._timeout_s + 5)) as r:
                    reply = await r.json(content_type=None)
                    status = r.status
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                raise TransferFailed(f"the prefill server {bootstrap.host}:{bootstrap.port} could not be "
                                     f"reached: {exc or type(exc).__name__}") from None
            if status != 200:
                raise TransferFailed(f"the prefill for room {bootstrap.room} failed: {reply.get('error', status)}")
            if reply.get("prompt_tokens") != prompt_tokens:
                raise TransferFailed(f"room {bootstrap.room} holds a prompt of {reply.get('prompt_tokens')} "
                                     f"tokens, not this request's {prompt_tokens}")
            await asyncio.sleep((self._overhead_s + self._per_token_s * prompt_tokens) * self._time_scale)
            self.last_latency_ms = (time.monotonic() - started) * 1000
        except TransferFailed:
            self.failed += 1
            raise
        finally:
            self.transferring -= 1

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
