"""KV-cache events on the wire, as vLLM and SGLang publish them (`--kv-events-config`).

A ZMQ PUB socket sends one message per engine step that changed the prefix cache: three frames,
`[topic, sequence number as 8 bytes big-endian (from 0 per engine), msgpack batch]`. The batch is
`[timestamp, events, data-parallel rank]`. Events: `BlockStored` (full blocks just cached: their
hashes, the parent's, their token ids, the block size, LoRA id, medium, LoRA name, extra keys per
block, KV-cache group), `BlockRemoved` (blocks whose space was reused), `AllBlocksCleared` (a prefix
cache reset). vLLM releases encode events either as positional arrays whose first element is the
type, or as maps with the type under "type" (`encoding`); SGLang sends one `BlockStored` per page.

A ROUTER socket (`replay_endpoint`) answers a client's start sequence number with every buffered
batch from there on, `[sequence, batch]` each, then the end marker (sequence -1) with an empty
frame. The last `buffer_steps` batches are kept. With data parallelism each rank's ports are the
configured ones plus the rank.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq
import zmq.asyncio

log = logging.getLogger("simulator.kv_events")

END_OF_REPLAY = (-1).to_bytes(8, "big", signed=True)
ENCODINGS = ("array", "map")


@dataclass(frozen=True)
class KvEventsConfig:
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    topic: str = ""
    buffer_steps: int = 10_000
    hwm: int = 100_000

    @classmethod
    def parse(cls, text: str, runtime: str) -> KvEventsConfig | None:
        """The engine's `--kv-events-config` JSON; None when it publishes nothing. vLLM needs
        `enable_kv_cache_events` and a publisher other than "null"; SGLang only the publisher."""
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("--kv-events-config must be a JSON object")
        publisher = raw.get("publisher", "zmq" if runtime == "vllm" else "null")
        if publisher in (None, "null") or (runtime == "vllm" and not raw.get("enable_kv_cache_events")):
            return None
        if publisher != "zmq":
            raise ValueError(f"unknown KV-events publisher {publisher!r}")
        known = {f: raw[f] for f in ("endpoint", "replay_endpoint", "topic", "buffer_steps", "hwm") if f in raw}
        return cls(**known)


def offset_endpoint(endpoint: str, host: str, rank: int) -> str:
    """The endpoint this pod binds: `*` becomes the pod's own address (pods of one simulator share a
    machine, as pods of a node do not), and the port moves up by the data-parallel rank."""
    scheme, _, address = endpoint.partition("://")
    where, _, port = address.rpartition(":")
    return f"{scheme}://{host if where in ('*', '0.0.0.0') else where}:{int(port) + rank}"


class KvEventPublisher:
    def __init__(self, config: KvEventsConfig, runtime: str, host: str, rank: int = 0,
                 encoding: str = "array") -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}")
        self.config, self.runtime, self.rank, self.encoding = config, runtime, rank, encoding
        self.endpoint = offset_endpoint(config.endpoint, host, rank)
        self.replay_endpoint = offset_endpoint(config.replay_endpoint, host, rank) if config.replay_endpoint else None
        self.seq = 0
        self._pending: list[Any] = []
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._context = zmq.asyncio.Context()
        self._pub_owner = self._context.socket(zmq.PUB)
        self._pub: zmq.Socket[bytes] = zmq.Socket.shadow(self._pub_owner.underlying)  # a plain view: a send never waits
        self._pub.setsockopt(zmq.SNDHWM, config.hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.bind(self.endpoint)
        self._router: zmq.asyncio.Socket | None = None
        self._replay: asyncio.Task[None] | None = None
        if self.replay_endpoint:
            self._router = self._context.socket(zmq.ROUTER)
            self._router.setsockopt(zmq.LINGER, 0)
            self._router.bind(self.replay_endpoint)

    def start(self) -> None:
        if self._router is not None:
            self._replay = asyncio.get_running_loop().create_task(self._serve_replay(self._router))

    async def close(self) -> None:
        if self._replay is not None:
            self._replay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay
        self._pub_owner.close()
        if self._router is not None:
            self._router.close()
        self._context.term()

    # -- events of one step ----------------------------------------------------------------

    def stored(self, hashes: list[int], parent: int | None, tokens: list[int], block_size: int,
               lora_id: int | None, lora_name: str | None, extra: list[Any] | None) -> None:
        if self.runtime == "sglang":
            self._event("BlockStored", block_hashes=hashes, parent_block_hash=parent, token_ids=tokens,
                        block_size=block_size, lora_id=None, medium="GPU")
            return
        self._event("BlockStored", block_hashes=hashes, parent_block_hash=parent, token_ids=tokens,
                    block_size=block_size, lora_id=lora_id, medium="GPU", lora_name=lora_name,
                    extra_keys=extra, group_idx=0, kv_cache_spec_kind="full_attention",
                    kv_cache_spec_sliding_window=None)

    def removed(self, hashes: list[int]) -> None:
        if self.runtime == "sglang":
            self._event("BlockRemoved", block_hashes=hashes, medium="GPU")
        else:
            self._event("BlockRemoved", block_hashes=hashes, medium="GPU", group_idx=0)

    def cleared(self) -> None:
        self._event("AllBlocksCleared")

    def _event(self, kind: str, **fields: Any) -> None:
        if self.encoding == "map":
            self._pending.append({"type": kind, **fields})
        else:
            self._pending.append([kind, *fields.values()])

    def flush(self) -> None:
        """End of an engine step: one message with the step's events, if any."""
        if not self._pending:
            return
        payload = msgpack.packb([time.time(), self._pending, self.rank], use_bin_type=True)
        self._pending = []
        seq = self.seq.to_bytes(8, "big")
        self._buffer.append((self.seq, payload))
        self.seq += 1
        with contextlib.suppress(zmq.Again):
            self._pub.send_multipart([self.config.topic.encode(), seq, payload], flags=zmq.NOBLOCK)

    async def _serve_replay(self, router: zmq.asyncio.Socket) -> None:
        while True:
            frames = await router.recv_multipart()
            if len(frames) != 3 or len(frames[2]) != 8:
                log.warning("replay request of %d frames ignored", len(frames))
                continue
            identity, start = frames[0], int.from_bytes(frames[2], "big")
            for seq, payload in list(self._buffer):
                if seq >= start:
                    await router.send_multipart([identity, b"", seq.to_bytes(8, "big"), payload])
            await router.send_multipart([identity, b"", END_OF_REPLAY, b""])
