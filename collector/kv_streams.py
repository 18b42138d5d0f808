"""Following the KV-event streams of the endpoints this collector owns.

Each owned endpoint of a pool indexed from engine events gets one `KvEventStream`: a ZMQ SUB socket on
the engine's publisher, and a DEALER on its replay socket. The stream picks up where the index left
off (the last sequence number applied and the endpoint's block names, both in Redis), so a collector
that takes over a dead one's endpoints asks the replay buffer for what it missed and goes on without a
gap. In order, every batch is one Redis call (`KvIndexStore.kv_apply`; a few in order on a cluster).
A sequence number that skips ahead is asked again from the replay buffer; one that goes back to an
earlier number with a different batch is a restarted engine, whose cache is empty: the endpoint's
entries are dropped and rebuilt from the new engine's buffer. A message that does not decode is counted
and skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import zmq
import zmq.asyncio
from redis.exceptions import RedisError

from collector.kv_events import EndpointIndex, Undecodable, decode_batch
from collector.metrics import CollectorMetrics
from gateway_state.clock import FleetClock
from gateway_state.kv_index_store import KvIndexStore, KvOp, Stored
from gateway_state.lifecycle import cancel_and_wait
from gateway_state.records import Config, Endpoint, KvEvents, KvStreamStatus, LoadSample

log = logging.getLogger("collector.kv")

END_OF_REPLAY = (-1).to_bytes(8, "big", signed=True)
HEARTBEAT_S = 1.0  # a quiet stream's status is rewritten this often (the pickers judge its age)
REPLAY_TIMEOUT_S = 2.0
# A stream is silent when its engine computed this many prompt tokens since its last message, and the
# last message is older than SILENT_AFTER_MS: the engine serves, but its events do not arrive.
SILENT_TOKENS = 256
SILENT_AFTER_MS = 5000
_RECENT = 4096  # batches remembered (by digest) to tell a duplicate from a restarted engine's batch


@dataclass
class _Counts:
    batches: int = 0
    gaps: int = 0
    resyncs: int = 0
    garbage: int = 0
    orphans: int = 0


class KvEventStream:
    def __init__(self, store: KvIndexStore, pool: str, endpoint: Endpoint, source: KvEvents, seed: int,
                 collector_id: str, metrics: CollectorMetrics, clock: FleetClock) -> None:
        self._store, self.pool, self.endpoint, self.source = store, pool, endpoint, source
        self._seed, self._collector, self._metrics, self._clock = seed, collector_id, metrics, clock
        self.index = EndpointIndex(seed)
        self.seq = -1
        self.state = "connecting"
        self.blocks = 0
        self.counts = _Counts()
        self.lag_ms = 0.0
        self.last_event_ms = 0
        self._last_message = time.monotonic()
        self._computed_at_message: float | None = None  # the engine's uncached-token counter then
        self._computed = 0.0
        self._recent: OrderedDict[int, bytes] = OrderedDict()
        self._restart_seen = False
        self._context = zmq.asyncio.Context.instance()

    # -- the loop -----------------------------------------------------------------------

    async def run(self) -> None:
        await self._resume()
        sub = self._context.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"tcp://{self.endpoint.address}:{self.source.port}")
        try:
            await self._catch_up(self.seq + 1)
            while True:
                try:
                    async with asyncio.timeout(HEARTBEAT_S):  # not wait_for (see lifecycle.every)
                        frames = await sub.recv_multipart()
                except TimeoutError:
                    frames = None
                if self._restart_seen:  # the engine's counters fell: a new process, whatever its batches say
                    self._restart_seen = False
                    await self._restarted()
                if frames is None:
                    await self._heartbeat()
                else:
                    await self._on_message(frames)
        finally:
            sub.close()

    async def _resume(self) -> None:
        """Pick up the index where the last owner left it."""
        while True:
            try:
                legacy = await self._store.drop_legacy(self.pool, self.endpoint.key)
                blocks = await self._store.kv_block_map(self.pool, self.endpoint.key)
                prior = (await self._store.kv_statuses(self.pool)).get(self.endpoint.key)
                break
            except RedisError as exc:
                log.warning("cannot read the KV index of %s: %s", self.endpoint.key, exc)
                await asyncio.sleep(1.0)
        self.index = EndpointIndex(self._seed, blocks)
        self.blocks = len(blocks)
        if prior is not None:
            self.seq = prior.seq
            self.index.block_size = prior.block_size
            self.counts = _Counts(prior.batches, prior.gaps, prior.resyncs, prior.garbage, prior.orphans)
        if legacy:  # written by a collector of the layout before buckets: rebuilt from the replay buffer
            log.info("KV index of %s: dropped %d blocks of the earlier layout; rebuilding", self.endpoint.key, legacy)
            self.seq = -1

    async def _on_message(self, frames: list[bytes]) -> None:
        if len(frames) != 3 or len(frames[1]) != 8:
            self._garbage(f"a message of {len(frames)} frames")
            return
        seq, payload = int.from_bytes(frames[1], "big"), frames[2]
        if seq == self.seq + 1:
            await self._apply(seq, payload)
        elif seq > self.seq + 1:
            self.counts.gaps += 1
            self._metrics.kv_gaps.labels(self.pool, self.endpoint.key).inc()
            log.info("KV events of %s: expected batch %d, got %d; asking the replay buffer",
                     self.endpoint.key, self.seq + 1, seq)
            await self._catch_up(self.seq + 1)
            if seq > self.seq:
                await self._apply(seq, payload)
        elif self._recent.get(seq) != _digest(payload):
            # An earlier number, another batch: the engine restarted, and its cache with it.
            log.info("KV events of %s went back from batch %d to %d: the engine restarted",
                     self.endpoint.key, self.seq, seq)
            await self._restarted()
            if seq > self.seq:
                await self._apply(seq, payload)

    def restart_seen(self) -> None:
        """The collector saw the engine's counters fall: a new process (its first batches may have gone
        by before this stream reconnected, and later ones may number past the old engine's)."""
        self._restart_seen = True

    async def _restarted(self) -> None:
        """The engine restarted: its entries go, and what the new engine buffered rebuilds them."""
        await self._resync()
        await self._catch_up(0)

    async def _catch_up(self, start: int) -> None:
        """Apply what the replay buffer holds from `start`; where it starts later (the batches between are
        gone), the endpoint's entries cannot be trusted: they are dropped, and rebuilt from what it holds."""
        if not self.source.replay_port:
            return
        dealer = self._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(f"tcp://{self.endpoint.address}:{self.source.replay_port}")
        try:
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            first = True
            while True:
                async with asyncio.timeout(REPLAY_TIMEOUT_S):
                    frames = await dealer.recv_multipart()
                if len(frames) != 3 or len(frames[1]) != 8:
                    self._garbage(f"a replay message of {len(frames)} frames")
                    continue
                if frames[1] == END_OF_REPLAY:
                    self._heard()
                    return
                seq = int.from_bytes(frames[1], "big")
                if first and seq > start and (self.seq >= 0 or self.blocks):
                    log.info("KV events of %s: batches %d to %d are gone from the replay buffer; rebuilding",
                             self.endpoint.key, start, seq - 1)
                    await self._resync()
                first = False
                if seq > self.seq:
                    await self._apply(seq, frames[2])
        except TimeoutError:
            log.info("the replay socket of %s did not answer in %.0f s", self.endpoint.key, REPLAY_TIMEOUT_S)
        finally:
            dealer.close()

    async def _resync(self) -> None:
        self.counts.resyncs += 1
        self._metrics.kv_resyncs.labels(self.pool, self.endpoint.key).inc()
        self.seq = -1
        self._recent.clear()
        await self._write(self.index.clear())

    async def _apply(self, seq: int, payload: bytes) -> None:
        try:
            ts, events = decode_batch(payload)
        except Undecodable as exc:
            self._garbage(str(exc))
            self.seq = seq
            return
        ops, orphans = self.index.apply(events)
        self.counts.batches += 1
        self.counts.orphans += orphans
        if orphans:
            self._metrics.kv_orphans.labels(self.pool, self.endpoint.key).inc(orphans)
        self.seq = seq
        self.lag_ms = max(0.0, time.time() * 1000 - ts * 1000)
        self.last_event_ms = self._clock.now_ms()
        self._metrics.kv_lag.labels(self.pool, self.endpoint.key).set(self.lag_ms / 1000)
        self._metrics.kv_batches.labels(self.pool).inc()
        stored = sum(1 for op in ops if isinstance(op, Stored))
        if stored:
            self._metrics.kv_blocks_applied.labels(self.pool, "stored").inc(stored)
        if len(ops) > stored:
            self._metrics.kv_blocks_applied.labels(self.pool, "removed").inc(len(ops) - stored)
        self._recent[seq] = _digest(payload)
        while len(self._recent) > _RECENT:
            self._recent.popitem(last=False)
        self._heard()
        await self._write(ops)

    async def _write(self, ops: list[KvOp]) -> None:
        """One call per batch; while Redis cannot take it, the stream waits (the engine's messages queue,
        and a batch lost meanwhile is asked again from the replay buffer)."""
        self.blocks = len(self.index.blocks)  # what the index holds once the batch is applied
        while True:
            try:
                await self._store.kv_apply(self.pool, self.endpoint.key, ops, self.status())
                break
            except RedisError as exc:
                log.warning("cannot apply KV events of %s: %s", self.endpoint.key, exc)
                await asyncio.sleep(0.5)
        self._export()

    async def _heartbeat(self) -> None:
        self._judge()
        try:
            await self._store.write_kv_statuses(self.pool, {self.endpoint.key: self.status()})
        except RedisError as exc:
            log.warning("cannot write the KV stream status of %s: %s", self.endpoint.key, exc)
        self._export()

    # -- state --------------------------------------------------------------------------

    def observe(self, sample: LoadSample) -> None:
        """The endpoint's latest load sample: how many prompt tokens it has computed, to tell a quiet
        engine from a silent stream."""
        if sample.ok:
            self._computed = sample.prompt_tokens - sample.cached_prompt_tokens
            if self._computed_at_message is None or self._computed < self._computed_at_message:
                self._computed_at_message = self._computed

    def _heard(self) -> None:
        self._last_message = time.monotonic()
        self._computed_at_message = self._computed
        self.state = "live"

    def _judge(self) -> None:
        quiet_ms = (time.monotonic() - self._last_message) * 1000
        busy = self._computed_at_message is not None and self._computed - self._computed_at_message >= SILENT_TOKENS
        if quiet_ms > SILENT_AFTER_MS and busy:
            if self.state != "silent":
                log.warning("KV events of %s are silent: the engine computed %.0f prompt tokens in %.0f s "
                            "without an event", self.endpoint.key, self._computed - (self._computed_at_message or 0),
                            quiet_ms / 1000)
            self.state = "silent"

    def _garbage(self, what: str) -> None:
        self.counts.garbage += 1
        self._metrics.kv_garbage.labels(self.pool, self.endpoint.key).inc()
        log.warning("KV events of %s: skipped %s", self.endpoint.key, what)

    def status(self) -> KvStreamStatus:
        c = self.counts
        return KvStreamStatus(self._collector, self.state, self._clock.now_ms(), self.seq, self.blocks,
                              self.index.block_size, self.last_event_ms, round(self.lag_ms, 1), c.batches, c.gaps,
                              c.resyncs, c.garbage, c.orphans)

    def _export(self) -> None:
        labels = (self.pool, self.endpoint.key)
        self._metrics.kv_live.labels(*labels).set(1 if self.state == "live" else 0)
        self._metrics.kv_silent.labels(*labels).set(1 if self.state == "silent" else 0)
        self._metrics.kv_sequence.labels(*labels).set(self.seq)
        self._metrics.kv_blocks.labels(*labels).set(self.blocks)


def _digest(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, digest_size=16).digest()


class KvStreams:
    """The streams of the endpoints this collector owns, started and stopped as ownership and pools change."""

    def __init__(self, store: KvIndexStore, collector_id: str, metrics: CollectorMetrics, clock: FleetClock) -> None:
        self._store, self._collector, self._metrics, self._clock = store, collector_id, metrics, clock
        self._streams: dict[tuple[str, str], tuple[KvEventStream, asyncio.Task[None]]] = {}
        self._stopping: set[asyncio.Task[None]] = set()  # streams stopped, until they have ended

    def reconcile(self, config: Config, mine: set[str]) -> None:
        wanted = {(pool.name, e.key): (pool, e) for pool in config.pools.values() if pool.kv_events is not None
                  for e in pool.endpoints if e.key in mine}
        for key in list(self._streams):
            stream, _ = self._streams[key]
            pool = config.pools.get(key[0])
            if key not in wanted or pool is None or pool.kv_events != stream.source \
                    or wanted[key][1].address != stream.endpoint.address:
                self._stop(key)
        for key, (pool, endpoint) in wanted.items():
            if key not in self._streams:
                assert pool.kv_events is not None
                stream = KvEventStream(self._store, pool.name, endpoint, pool.kv_events, config.prefix_seed,
                                       self._collector, self._metrics, self._clock)
                task = asyncio.get_running_loop().create_task(_guarded(stream), name=f"kv-{endpoint.key}")
                self._streams[key] = (stream, task)
        self._metrics.kv_streams.set(len(self._streams))

    def restarted(self, pool: str, endpoint: str) -> None:
        found = self._streams.get((pool, endpoint))
        if found is not None:
            found[0].restart_seen()

    def observe(self, pool: str, samples: dict[str, LoadSample]) -> None:
        for endpoint, sample in samples.items():
            found = self._streams.get((pool, endpoint))
            if found is not None:
                found[0].observe(sample)

    def _stop(self, key: tuple[str, str]) -> None:
        _, task = self._streams.pop(key)
        # Cancelled until it ends: a stream that ran on would write the entries of an endpoint another
        # collector now owns.
        stopping = asyncio.get_running_loop().create_task(cancel_and_wait(task), name=f"stop {task.get_name()}")
        self._stopping.add(stopping)
        stopping.add_done_callback(self._stopping.discard)
        m = self._metrics
        for gauge in (m.kv_live, m.kv_silent, m.kv_sequence, m.kv_blocks, m.kv_lag):
            with contextlib.suppress(KeyError):
                gauge.remove(*key)

    async def close(self) -> None:
        for key in list(self._streams):
            self._stop(key)
        await asyncio.gather(*self._stopping)


async def _guarded(stream: KvEventStream) -> None:
    """A stream that fails in an unexpected way starts over from the index in Redis, never takes the
    collector down."""
    while True:
        try:
            await stream.run()
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 (the stream's guard: see above)
            log.exception("the KV event stream of %s failed; following it again", stream.endpoint.key)
            await asyncio.sleep(1.0)
