"""What every process's entry point does the same way: stop on signals, connect, run periodically."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.sentinel import Sentinel

RedisClient = Redis | RedisCluster

log = logging.getLogger("lifecycle")


LINE_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"  # every process's, and LineLog's


def configure_logging(level: str = "INFO") -> None:
    """One line format for every process, so their logs read and grep alike.

    The format names neither source line, thread nor process, so records do not look them up
    (the logging module's documented optimizations): the picker logs a line per request.
    """
    logging.basicConfig(level=level.upper(), format=LINE_FORMAT)
    logging._srcfile = None  # the documented switch for caller lookup
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


class LineLog:
    """A logger's INFO lines as `configure_logging` formats them, written without the logging module's
    record, filters and formatter: for a line per request (the picker's record of each decision), where
    that machinery cost about 0.03 ms of a decision's CPU over gRPC (docs/benchmarks.md). The logger's level
    still decides; the line goes to the stream of the root logger's first stream handler (standard error
    by default)."""

    def __init__(self, name: str) -> None:
        self._logger = logging.getLogger(name)
        self._infix = f" INFO {name} "
        self._second, self._stamp = -1, ""

    def info(self, message: str, *args: object) -> None:
        if not self._logger.isEnabledFor(logging.INFO):
            return
        now = time.time()
        second = int(now)
        if second != self._second:  # the date and time, formatted once a second
            self._second, self._stamp = second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        _stream().write(f"{self._stamp},{int((now - second) * 1000):03d}{self._infix}{message % args}\n")


def _stream() -> Any:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            return handler.stream
    return sys.stderr


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM, for a graceful stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


CLUSTER_SCHEME = "redis-cluster://"
SENTINEL_SCHEME = "redis-sentinel://"


def connect(redis_url: str, timeout_s: float = 2.0, max_connections: int | None = None) -> RedisClient:
    """A Redis client, connecting lazily on first use.

    - `redis://host:port/db`: one Redis.
    - `redis-cluster://host:port`: any node of a Redis Cluster; the client finds the
      others. Keys of one pool share a hash tag, so every script runs on one shard.
    - `redis-sentinel://host:port,host:port/master-name`: the Sentinels of a
      replicated Redis; the client follows the master through failovers.
    """
    if redis_url.startswith(SENTINEL_SCHEME):
        hosts, _, service = redis_url[len(SENTINEL_SCHEME):].partition("/")
        if not service:
            raise ValueError(f"{redis_url}: name the monitored master, as redis-sentinel://host:port/master-name")
        sentinels = [(h.rpartition(":")[0], int(h.rpartition(":")[2])) for h in hosts.split(",")]
        # Sentinel's constructor is typed only in recent redis-py releases.
        sentinel = cast(Any, Sentinel)(sentinels, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        client: Redis = sentinel.master_for(service, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                            max_connections=max_connections)
        return client
    if redis_url.startswith(CLUSTER_SCHEME):
        return RedisCluster.from_url("redis://" + redis_url[len(CLUSTER_SCHEME):], socket_timeout=timeout_s,
                                     socket_connect_timeout=timeout_s, max_connections=max_connections or 100)
    return Redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                          max_connections=max_connections)


async def every(interval_s: float, stop: asyncio.Event, action: Callable[[], Awaitable[object]]) -> None:
    """Run `action`, then wait out the rest of the interval, until `stop` is set.

    The waits here and in the other long-lived loops use `asyncio.timeout`, never `asyncio.wait_for`: on
    Python 3.11, a wait_for whose awaitable completes in the same turn as the task's cancel returns its
    result and the cancel is lost, so a loop stopped that way would run on (see `cancel_and_wait` for the
    wait_for calls inside libraries)."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        started = loop.time()
        await action()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, interval_s - (loop.time() - started))):
                await stop.wait()


CANCEL_AGAIN_S = 0.05  # how long a cancelled task may run on before it is cancelled again


async def cancel_and_wait(*tasks: asyncio.Task[Any]) -> None:
    """Cancel the tasks and return once every one has ended, cancelling again any that runs on.

    One cancel is not always enough on Python 3.11: redis-py wraps each command it sends in
    `asyncio.wait_for` when the client has a socket timeout (ours do, `connect`), and a wait_for whose
    awaitable completes in the turn the task is cancelled returns the result and drops the cancel (fixed
    in Python 3.12). A loop cancelled there would run on, and whoever awaits it would wait for ever.
    A task that ends with an error other than its cancel has it logged here."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=CANCEL_AGAIN_S)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            log.warning("task %s ended with an error", task.get_name(), exc_info=task.exception())
