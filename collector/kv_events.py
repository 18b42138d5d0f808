"""Engines' KV-cache events into the shared prefix index: decoding, and what each batch changes.

vLLM and SGLang publish a batch per engine step (`[timestamp, events, rank]`, msgpack). Events are
positional arrays whose first element is their type (earlier vLLM releases, SGLang), or maps with the
type under "type" (later vLLM releases); both decode, trailing optional fields may be absent, unknown
fields and unknown event types are ignored. Block hashes are 64-bit integers (vLLM's last 8 digest
bytes, SGLang's first 8, signed) or raw digests (vLLM without integer hashes): each is only an opaque
name of one engine's block here.

`EndpointIndex` turns one endpoint's events into index operations under our own block keys
(`gateway_state.block_keys`): a stored block's key chains from its parent's (which an earlier event
stored), or, for a first block, from the LoRA adapter and cache salt its extra keys carry. A block
whose parent the index never saw (stored before the stream was followed, and not replayable) cannot
be keyed: it is counted as an orphan and left out, as are its children.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from gateway_state.block_keys import engine_root, hex_key, token_block
from gateway_state.keys import index_bucket
from gateway_state.kv_index_store import Cleared, KvOp, Removed, Stored


class Undecodable(ValueError):
    """A message that is not a KV-event batch."""


@dataclass(frozen=True)
class BlockStored:
    hashes: tuple[str, ...]
    parent: str | None
    tokens: tuple[int, ...]
    block_size: int
    lora_name: str | None = None
    first_extra_keys: tuple[Any, ...] = ()  # the first block's extra keys (vLLM: adapter, salt on a first block)


@dataclass(frozen=True)
class BlockRemoved:
    hashes: tuple[str, ...]


@dataclass(frozen=True)
class AllBlocksCleared:
    pass


Event = BlockStored | BlockRemoved | AllBlocksCleared

# Positional field order after the type: vLLM's BlockStored (SGLang's is a prefix of it) and BlockRemoved.
_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name",
                  "extra_keys")
_REMOVED_FIELDS = ("block_hashes", "medium")


def engine_hash(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | bytes):
        raise Undecodable(f"a block hash must be an integer or bytes, got {type(value).__name__}")
    return str(value) if isinstance(value, int) else value.hex()


def decode_batch(payload: bytes) -> tuple[float, list[Event]]:
    """A batch's engine timestamp and its events, in order."""
    try:
        batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise Undecodable(f"not msgpack: {exc}") from None
    if isinstance(batch, dict):
        ts, events = batch.get("ts"), batch.get("events")
    elif isinstance(batch, list) and len(batch) >= 2:
        ts, events = batch[0], batch[1]
    else:
        raise Undecodable("a batch is [ts, events, rank]")
    if not isinstance(ts, int | float) or not isinstance(events, list):
        raise Undecodable("a batch's timestamp must be a number and its events a list")
    out = []
    for raw in events:
        event = _event(raw)
        if event is not None:
            out.append(event)
    return float(ts), out


def _event(raw: Any) -> Event | None:
    if isinstance(raw, dict):
        kind, fields = raw.get("type"), raw
    elif isinstance(raw, list) and raw and isinstance(raw[0], str):
        kind = raw[0]
        names = _STORED_FIELDS if kind == "BlockStored" else _REMOVED_FIELDS
        fields = dict(zip(names, raw[1:], strict=False))
    else:
        raise Undecodable("an event is a map with a type or an array led by its type")
    try:
        if kind == "BlockStored":
            hashes = tuple(engine_hash(h) for h in fields["block_hashes"])
            parent = fields.get("parent_block_hash")
            tokens = fields["token_ids"]
            size = fields["block_size"]
            if not hashes or type(size) is not int or size <= 0 or not isinstance(tokens, list) \
                    or not all(type(t) is int and t >= 0 for t in tokens):
                raise Undecodable("BlockStored needs hashes, a positive block size and token ids")
            if len(tokens) > len(hashes) * size or len(tokens) <= (len(hashes) - 1) * size:
                raise Undecodable(f"BlockStored of {len(hashes)} blocks of {size} carries {len(tokens)} tokens")
            lora = fields.get("lora_name")
            extra = fields.get("extra_keys")
            first = extra[0] if isinstance(extra, list) and extra and isinstance(extra[0], list | tuple) else ()
            return BlockStored(hashes, engine_hash(parent) if parent is not None else None, tuple(tokens), size,
                               lora if isinstance(lora, str) and lora else None, tuple(first))
        if kind == "BlockRemoved":
            return BlockRemoved(tuple(engine_hash(h) for h in fields["block_hashes"]))
        if kind == "AllBlocksCleared":
            return AllBlocksCleared()
    except (KeyError, TypeError) as exc:
        raise Undecodable(f"{kind}: {exc}") from None
    return None  # an event type this version does not know


def cache_salt(lora: str | None, first_extra_keys: Sequence[Any]) -> str | None:
    """The salt a first block's extra keys end with (vLLM: the adapter's name, then the salt)."""
    rest = list(first_extra_keys)
    if lora and rest and rest[0] == lora:
        rest = rest[1:]
    return rest[-1] if rest and isinstance(rest[-1], str) else None


class EndpointIndex:
    """One endpoint's blocks as its events describe them: engine hash -> (our key, bucket), the bucket
    that of the chain's first block (keys.index_bucket), as a picker computes it from the prompt."""

    def __init__(self, seed: int, blocks: dict[str, tuple[str, int]] | None = None) -> None:
        self.seed = seed
        self.blocks: dict[str, tuple[str, int]] = blocks if blocks is not None else {}
        self.block_size = 0

    def apply(self, events: Sequence[Event]) -> tuple[list[KvOp], int]:
        """The index operations of a batch, and how many stored blocks were orphans."""
        ops: list[KvOp] = []
        orphans = 0
        for event in events:
            if isinstance(event, BlockStored):
                orphans += self._stored(event, ops)
            elif isinstance(event, BlockRemoved):
                for h in event.hashes:
                    if (found := self.blocks.pop(h, None)) is not None:
                        ops.append(Removed(h, *found))
            else:
                ops += self.clear()
        return ops, orphans

    def clear(self) -> list[KvOp]:
        """Every block leaves: each one's holder entry, then the map."""
        ops: list[KvOp] = [Removed(h, key, bucket) for h, (key, bucket) in self.blocks.items()]
        self.blocks.clear()
        return [*ops, Cleared()]

    def _stored(self, event: BlockStored, ops: list[KvOp]) -> int:
        bucket: int | None = None
        if event.parent is None:
            parent = engine_root(event.lora_name, cache_salt(event.lora_name, event.first_extra_keys), self.seed)
        elif event.parent in self.blocks:
            key, bucket = self.blocks[event.parent]
            parent = int(key, 16)
        else:
            return len(event.hashes)
        size = event.block_size
        self.block_size = size
        for i, h in enumerate(event.hashes):
            parent = token_block(parent, event.tokens[i * size: (i + 1) * size], self.seed)
            key = hex_key(parent)
            if bucket is None:
                bucket = index_bucket(key)
            self.blocks[h] = (key, bucket)
            ops.append(Stored(h, key, bucket))
        return 0
