"""The one guard around the picker's calls to the shared state: deadlines, back-off, background work.

A state call that fails or misses its deadline never fails a request: the caller
falls back to this replica's own figures. After a failure the guard leaves the
state alone for a moment (`StateSettings.redis_backoff_ms`), so a stalled Redis
collects no backlog of calls that all complete at once when it recovers. Work
after a request (index writes, releases, leaving a queue) runs in tasks the
guard keeps referenced until they end, and waits for on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Coroutine
from typing import TypeVar

from redis.exceptions import RedisError

from picker.metrics import PickerMetrics

log = logging.getLogger("picker")
# What a failing Redis raises. RuntimeError too: redis-py's cluster client, on uvloop, raised "unable to
# perform operation on <TCPTransport closed=True>; the handler is closed" for a command sent as a node
# died (seen once in a full run: a client got a 500 where the pickers fall back to their own state).
STATE_ERRORS = (RedisError, OSError, TimeoutError, RuntimeError)
T = TypeVar("T")


class StateGuard:
    def __init__(self, metrics: PickerMetrics, timeout_ms: int, backoff_ms: int, label_prefix: str = "",
                 log_level: int = logging.DEBUG) -> None:
        """`label_prefix`: before the operation in `picker_redis_fallbacks_total{op}` (flow control's `queue-`).
        `log_level`: of the line a failure logs (once per back-off)."""
        self._metrics = metrics
        self._log_level = log_level
        self._timeout_s = timeout_ms / 1000
        self._backoff_s = backoff_ms / 1000
        self._prefix = label_prefix
        self._down_until = 0.0  # monotonic; before it, the state is not asked
        self._background: set[asyncio.Task[object]] = set()

    @property
    def usable(self) -> bool:
        """No call failed a moment ago."""
        return time.monotonic() >= self._down_until

    async def call(self, op: str, work: Awaitable[T], slack: float = 1.0, in_backoff: bool = False) -> T | None:
        """`work`'s result, or None when it failed, missed its deadline (`slack` times the request path's),
        or was not tried because a call failed a moment ago (unless `in_backoff`: work off the request path
        that would be lost if not tried, such as an index write)."""
        if not self.usable and not in_backoff:
            if asyncio.iscoroutine(work):
                work.close()  # never awaited: no warning about it
            self._metrics.of(self._metrics.redis_fallbacks, self._prefix + op).inc()
            return None
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout_s * slack):
                return await work
        except STATE_ERRORS as exc:
            self.failed(op, exc)
            return None
        finally:
            self._metrics.of(self._metrics.redis_call_seconds, self._prefix + op).observe(
                time.perf_counter() - started)

    def failed(self, op: str, exc: BaseException) -> None:
        """A state call failed: count it, and leave the state alone a moment."""
        self._metrics.of(self._metrics.redis_fallbacks, self._prefix + op).inc()
        now = time.monotonic()
        if now >= self._down_until:
            self._down_until = now + self._backoff_s
            log.log(self._log_level, "state %s%s failed, using this replica's own figures for %d ms: %s",
                    self._prefix, op, self._backoff_s * 1000, exc)

    def later(self, work: Coroutine[None, None, object]) -> None:
        """Run `work` off the request's path, to its end."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for the work still under way (shutdown)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
