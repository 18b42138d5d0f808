"""The one guard around the picker's calls to the shared state: deadlines, back-off, background work.

A state call that fails or misses its deadline never fails a request: the caller
falls back to this replica's own figures. After a failure the guard leaves the
state alone for a moment (`StateSettings.redis_backoff_ms`), so a stalled Redis
collects no backlog of calls that all complete at once when it recovers.

The deadline and the back-off are for a stalled Redis, not a busy one. At a
burst's start every replica's lookups and admissions queue in Redis at once, and
a replica's own requests keep its event loop busy, so calls take several times
their usual round trip while Redis is well:
- a reply is read by the same loop that runs every request, so an expiry that
  comes late (the loop was busy) may find the reply waiting unread: the call gets
  the time the loop ran late again, up to `LATE_LIMIT` times its deadline
  (`Deadline`);
- a call that misses its deadline falls back alone, and the next calls still ask
  Redis, unless Redis has answered none of this replica's calls for `STALLED_AFTER`
  deadlines while asked: then it is stalled, and the miss starts the back-off, as
  an error does. A burst's first call, from a replica idle before it, may miss
  its deadline on a loaded machine with no answer yet: backing off then would
  place the rest of the burst without the shared state. The back-off ends at the
  next answer of a call still under way (the state is not stalled then).

Work after a request (index writes, releases, leaving a queue) runs in tasks the
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
# How much longer than its deadline a call may wait while the event loop itself runs late.
LATE_LIMIT = 5.0
# How many request-path deadlines the state may go without answering any call while asked before it is taken
# for stalled: a busy Redis on a loaded machine answers a burst's calls tens of ms late, a stalled one never.
STALLED_AFTER = 5.0
_TIMER_SLACK_S = 0.002  # what a timer may run late on an idle loop (libuv counts in milliseconds)


class Deadline:
    """Expires an `asyncio.timeout` scope `seconds` from now, up to `limit_s` in all: when the expiry runs late
    (the loop was busy with other work, and the reply may be read in the same turn), the call waits that
    lateness again."""

    def __init__(self, scope: asyncio.Timeout, seconds: float, limit_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._scope = scope
        now = self._loop.time()
        self._due, self._limit = now + seconds, now + limit_s
        self._handle = self._loop.call_at(self._due, self._expire)

    def _expire(self) -> None:
        now = self._loop.time()
        late = now - self._due
        if late > _TIMER_SLACK_S and now < self._limit:
            self._due = min(now + late, self._limit)
            self._handle = self._loop.call_at(self._due, self._expire)
        else:
            self._scope.reschedule(now)

    def cancel(self) -> None:
        self._handle.cancel()


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
        self._asked: float | None = None  # perf_counter: the first call made since the state last answered one
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
            self.skip(op)
            return None
        started = time.perf_counter()
        if self._asked is None:
            self._asked = started
        try:
            async with asyncio.timeout(None) as scope:
                deadline = Deadline(scope, self._timeout_s * slack, self._timeout_s * slack * LATE_LIMIT)
                try:
                    result = await work
                finally:
                    deadline.cancel()
            self.answered()
            return result
        except STATE_ERRORS as exc:
            # A miss while Redis answered lately is a busy Redis (a burst), not a stalled one: only this call
            # falls back, and the next ones still ask it.
            silent_s = time.perf_counter() - self._asked if self._asked is not None else 0.0
            self.failed(op, exc, busy=isinstance(exc, TimeoutError) and silent_s < self._timeout_s * STALLED_AFTER)
            return None
        finally:
            self._metrics.of(self._metrics.redis_call_seconds, self._prefix + op).observe(
                time.perf_counter() - started)

    def skip(self, op: str) -> None:
        """A call not tried because one failed a moment ago (`usable` is false): counted as a fallback."""
        self._metrics.of(self._metrics.redis_fallbacks, self._prefix + op).inc()

    def answered(self) -> None:
        """The state answered a call (one made through `call`, or one answered after its caller fell back): it
        is not stalled, so a back-off under way ends."""
        self._asked = None
        self._down_until = 0.0

    def failed(self, op: str, exc: BaseException, busy: bool = False) -> None:
        """A state call failed: count it, and leave the state alone a moment (unless it is `busy`: it
        answers other calls)."""
        self._metrics.of(self._metrics.redis_fallbacks, self._prefix + op).inc()
        now = time.monotonic()
        if not busy and now >= self._down_until:
            self._down_until = now + self._backoff_s
            log.log(self._log_level, "state %s%s failed, using this replica's own figures for %d ms: %s",
                    self._prefix, op, self._backoff_s * 1000, exc)

    def later(self, work: Coroutine[None, None, object]) -> None:
        """Run `work` off the request's path, to its end."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for the work still under way (shutdown), and for what it starts meanwhile: a write that work
        gathered may go in a task of its own before the first wait ends."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
