"""The request path's lean Redis link, against a real redis-server: replies stay with their callers,
and every failure redis-py would report is reported alike, after which the link connects again."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import uvloop
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import ConnectionError, ResponseError

from gateway_state.script_link import ScriptLink
from tests.conftest import BIN, free_port

ECHO = "return ARGV[1]"


def start_redis(port: int, *extra: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([str(BIN / "redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", *extra], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port, password=dict(zip(extra[::2], extra[1::2], strict=True)).get("--requirepass"))
    for _ in range(100):
        try:
            client.ping()
            return proc
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


@pytest.fixture
def own_redis() -> Iterator[int]:
    port = free_port()
    proc = start_redis(port)
    yield port
    proc.kill()
    proc.wait()


async def test_replies_reach_their_own_callers_when_some_stop_waiting(own_redis: int) -> None:
    link = ScriptLink("127.0.0.1", own_redis)
    echo = link.script(ECHO)
    assert await echo([], ["warm"]) == b"warm"
    async with Redis(port=own_redis) as other:
        stall = asyncio.create_task(other.execute_command("DEBUG", "SLEEP", "0.6"))
        await asyncio.sleep(0.05)
        given_up = 0
        for i in range(4):  # sent while Redis sleeps; their callers leave after 50 ms
            try:
                async with asyncio.timeout(0.05):
                    await echo([], [f"late {i}"])
            except TimeoutError:
                given_up += 1
        await stall
    assert given_up == 4
    answers = await asyncio.gather(*(echo([], [f"now {i}"]) for i in range(20)))
    assert answers == [f"now {i}".encode() for i in range(20)]
    link.close()


async def test_a_flushed_script_cache_and_error_replies(own_redis: int) -> None:
    link = ScriptLink("127.0.0.1", own_redis)
    echo = link.script(ECHO)
    assert await echo([], ["a"]) == b"a"
    async with Redis(port=own_redis) as other:
        await other.script_flush()
    assert await echo([], ["b"]) == b"b"  # NOSCRIPT: sent again by its source
    with pytest.raises(ResponseError, match="boom"):
        await link.script("return redis.error_reply('boom')")([], [])
    assert await echo([], ["c"]) == b"c"
    link.close()


async def test_a_restarted_redis_is_reached_again() -> None:
    port = free_port()
    proc = start_redis(port)
    link = ScriptLink("127.0.0.1", port)
    echo = link.script(ECHO)
    assert await echo([], ["before"]) == b"before"
    proc.kill()
    proc.wait()
    with pytest.raises(ConnectionError):  # the connection is gone, and nothing listens
        for _ in range(20):
            await echo([], ["down"])
            await asyncio.sleep(0.05)
    proc = start_redis(port)
    try:
        assert await echo([], ["after"]) == b"after"
    finally:
        link.close()
        proc.kill()
        proc.wait()


async def test_a_redis_that_stops_answering_fails_calls_instead_of_queueing_them(own_redis: int) -> None:
    link = ScriptLink("127.0.0.1", own_redis, stale_s=0.2)
    echo = link.script(ECHO)
    assert await echo([], ["x"]) == b"x"
    async with Redis(port=own_redis) as other:
        stall = asyncio.create_task(other.execute_command("DEBUG", "SLEEP", "0.6"))
        await asyncio.sleep(0.05)
        first = echo([], ["stalled"])
        await asyncio.sleep(0.3)
        started = time.monotonic()
        with pytest.raises(ConnectionError):
            await echo([], ["behind"])
        assert time.monotonic() - started < 0.1
        with pytest.raises(ConnectionError):
            await first  # failed with the dropped connection
        await stall
    assert await echo([], ["fresh"]) == b"fresh"
    link.close()


async def test_password_and_database_of_the_client_url() -> None:
    port = free_port()
    proc = start_redis(port, "--requirepass", "s3cret")
    try:
        client = Redis.from_url(f"redis://:s3cret@127.0.0.1:{port}/2")
        link = ScriptLink.for_client(client)
        assert link is not None
        await link.script("redis.call('SET', KEYS[1], ARGV[1]) return 1")(["k"], ["v"])
        assert await client.get("k") == b"v"  # the client's database, 2
        assert await Redis.from_url(f"redis://:s3cret@127.0.0.1:{port}/0").get("k") is None
        wrong = ScriptLink("127.0.0.1", port, password="nope")
        with pytest.raises(ResponseError):
            await wrong.script(ECHO)([], ["x"])
        link.close()
        await client.aclose()
    finally:
        proc.kill()
        proc.wait()


def test_only_a_plain_redis_over_tcp_gets_a_link(tmp_path: Path) -> None:
    assert ScriptLink.for_client(Redis(port=6399)) is not None
    assert ScriptLink.for_client(Redis(unix_socket_path=str(tmp_path / "redis.sock"))) is None
    assert ScriptLink.for_client(Redis(port=6399, ssl=True)) is None
    assert ScriptLink.for_client(RedisCluster(host="127.0.0.1", port=6399)) is None


def test_the_link_on_the_pickers_event_loop(own_redis: int) -> None:
    """The picker runs on uvloop, whose transports are its own classes."""
    async def calls() -> list[bytes]:
        link = ScriptLink("127.0.0.1", own_redis)
        try:
            return list(await asyncio.gather(*(link.script(ECHO)([], [str(i)]) for i in range(50))))
        finally:
            link.close()

    assert uvloop.run(calls()) == [str(i).encode() for i in range(50)]
