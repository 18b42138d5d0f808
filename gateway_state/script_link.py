"""A lean connection for the Lua scripts on the picker's request path.

redis-py spends about 80 us of CPU on each call beyond the round trip itself
(connection pool, retry wrapper, event hooks, command packing), and a decision
makes two calls, plus its share of the writes after it. This link sends the
same EVALSHA commands over one pipelined TCP connection: replies come back in
order, so each call is a future in a queue, and hiredis parses the replies.
It serves one plain Redis (`redis://`, with its password and database); a
Redis Cluster, Sentinel, TLS or a Unix socket keep redis-py (`for_client`
says which).

Failures look like redis-py's: a Redis error reply raises ResponseError, a
lost or stale connection ConnectionError, and the next call connects again.
A call the caller stops waiting for (a timeout) keeps its place in the queue,
so the replies after it still reach their own callers; a connection whose
oldest call is older than `stale_s` is dropped rather than queued behind.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError, NoScriptError, ResponseError


class LinkedScript:
    """A Lua script run through a ScriptLink: by its SHA1, and by its source when Redis does not hold it."""

    def __init__(self, link: ScriptLink, source: str) -> None:
        self._link = link
        self._source = source.encode()
        self._sha = hashlib.sha1(self._source).hexdigest().encode()  # noqa: S324 (Redis names scripts by SHA1)

    def __call__(self, keys: Sequence[str], args: Sequence[str | int]) -> asyncio.Future[Any]:
        """The reply, as a future: sent now, with no coroutine or task of its own, so a caller may stop waiting
        and another keep waiting for the same reply (shielded). A new or flushed Redis answers NOSCRIPT, and the
        link sends the script's source in its place (EVAL runs it and keeps it for the next EVALSHA)."""
        return self._link.request((b"EVALSHA", self._sha, len(keys), *keys, *args), self._source)


class _Replies(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        # Calls sent, oldest first: the reply's future, when it was sent, and for a script called by its SHA1,
        # its source and the call's arguments (to send it again by its source if Redis answers NOSCRIPT).
        self.waiting: deque[tuple[asyncio.Future[Any], float, bytes | None, Sequence[bytes | str | int]]] = deque()
        self.lost = False
        self._reader = hiredis.Reader()
        self._corked: list[bytes] = []  # commands of this turn of the event loop, not yet written

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's TCP transport is not the class itself

    def queue(self, args: Sequence[bytes | str | int], source: bytes | None = None,
              waiter: asyncio.Future[Any] | None = None) -> asyncio.Future[Any]:
        """Send a command; its reply will be the future's result."""
        loop = asyncio.get_running_loop()
        if waiter is None:
            waiter = loop.create_future()
        self.waiting.append((waiter, loop.time(), source, args))
        self.send(_pack(args))
        return waiter

    def send(self, command: bytes) -> None:
        """Queue a command; the calls made in one turn of the event loop leave in one write, so Redis reads
        them in one go (a wake-up, a read and a write for all of them: half its CPU per call, measured)."""
        if not self._corked:
            asyncio.get_running_loop().call_soon(self._flush)
        self._corked.append(command)

    def _flush(self) -> None:
        corked, self._corked = self._corked, []
        if self.transport is not None and not self.lost and corked:
            self.transport.write(b"".join(corked))

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            waiter, _, source, args = self.waiting.popleft()
            if waiter.done():  # its caller stopped waiting
                continue
            if isinstance(reply, hiredis.ReplyError):
                text = str(reply)
                if text.startswith("NOSCRIPT") and source is not None:  # the same call, by the script's source
                    self.queue((b"EVAL", source, *args[2:]), None, waiter)
                    continue
                waiter.set_exception(NoScriptError(text) if text.startswith("NOSCRIPT") else ResponseError(text))
            else:
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        while self.waiting:
            waiter, *_ = self.waiting.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectionError(f"Redis closed the connection: {exc or 'EOF'}"))


def _pack(args: Sequence[bytes | str | int]) -> bytes:
    """One command in Redis's protocol (hiredis's C packer: 2.5 us for a script call of 28 arguments against 6.6 us
    for the same loop in Python)."""
    command: Any = tuple(args)  # hiredis's type stub takes a tuple of one item only
    return cast(bytes, hiredis.pack_command(command))


class ScriptLink:
    def __init__(self, host: str, port: int, db: int = 0, username: str | None = None,
                 password: str | None = None, connect_timeout_s: float = 1.0, stale_s: float = 2.0) -> None:
        self._address = (host, port)
        self._hello: list[tuple[bytes | str | int, ...]] = []  # sent first on every connection
        if password:
            self._hello.append((b"AUTH", *([username] if username else []), password))
        if db:
            self._hello.append((b"SELECT", db))
        self._connect_timeout_s = connect_timeout_s
        self._stale_s = stale_s
        self._replies: _Replies | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connecting: asyncio.Future[_Replies] | None = None

    @classmethod
    def for_client(cls, client: object) -> ScriptLink | None:
        """A link to the same Redis as a plain redis-py client over TCP; None for anything else."""
        if type(client) is not Redis:
            return None
        pool = client.connection_pool
        if type(pool).__name__ != "ConnectionPool" or pool.connection_class is not Connection:
            return None  # Sentinel follows its master; TLS and Unix sockets are not spoken here
        kw = pool.connection_kwargs
        return cls(kw.get("host", "localhost"), int(kw.get("port", 6379)), int(kw.get("db", 0) or 0),
                   kw.get("username"), kw.get("password"), float(kw.get("socket_connect_timeout") or 1.0),
                   float(kw.get("socket_timeout") or 2.0))

    def script(self, source: str) -> LinkedScript:
        return LinkedScript(self, source)

    def request(self, args: Sequence[bytes | str | int], source: bytes | None = None) -> asyncio.Future[Any]:
        """Send one command (an EVALSHA of the script `source`, if given); its reply is the future's result.
        Failures are the future's too, never raised here."""
        loop = asyncio.get_running_loop()
        replies = self._replies
        if replies is None or replies.lost or self._loop is not loop:
            return asyncio.ensure_future(self._connect_and_send(loop, args, source))  # a task only to connect
        if replies.waiting and loop.time() - replies.waiting[0][1] > self._stale_s:
            self.close()  # Redis has not answered for too long: fail what waits, connect afresh
            failed: asyncio.Future[Any] = loop.create_future()
            failed.set_exception(ConnectionError(f"Redis did not answer within {self._stale_s} s"))
            return failed
        return replies.queue(args, source)

    async def _connect_and_send(self, loop: asyncio.AbstractEventLoop, args: Sequence[bytes | str | int],
                                source: bytes | None) -> Any:
        return await (await self._connect(loop)).queue(args, source)

    async def commands(self, commands: Sequence[Sequence[bytes | str | int]]) -> list[Any]:
        """Several commands in one write, their replies in order (a pipeline, without redis-py's cost per
        command); the first error raises once every reply is in."""
        results, error = [], None
        for waiter in [self.request(args) for args in commands]:
            try:
                results.append(await waiter)
            except Exception as exc:  # noqa: BLE001 (kept, raised after the rest are in)
                error = error or exc
                results.append(None)
        if error is not None:
            raise error
        return results

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Replies:
        if self._connecting is not None and self._loop is loop:
            return await asyncio.shield(self._connecting)  # one connection however many calls wait for it
        self.close()
        self._loop, connecting = loop, loop.create_future()
        self._connecting = connecting
        replies: _Replies | None = None
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, replies = await loop.create_connection(_Replies, *self._address)
                for hello in self._hello:
                    await replies.queue(hello)
        except BaseException as exc:
            if replies is not None and replies.transport is not None:
                replies.transport.close()
            error = exc if isinstance(exc, ResponseError | ConnectionError) else ConnectionError(
                f"cannot connect to Redis at {self._address[0]}:{self._address[1]}: {exc!r}")
            connecting.set_exception(error)
            connecting.exception()  # retrieved here: calls waiting on it get it through shield
            self._connecting = None
            if isinstance(exc, Exception):
                raise error from exc
            raise  # cancelled
        self._replies = replies
        connecting.set_result(replies)
        self._connecting = None
        return replies

    def close(self) -> None:
        if self._replies is not None and self._replies.transport is not None and not self._replies.lost:
            self._replies.transport.close()
            self._replies.connection_lost(None)
        self._replies = None
