"""Block hashes as the engines compute them, and as they put them on the wire in KV-cache events.

vLLM (`--prefix-caching-hash-algo`): a block's hash is SHA-256 over the serialized tuple (parent's
hash, or the process's NONE_HASH for a first block; the block's token ids; its extra keys), the tuple
serialized with pickle ("sha256", the default) or canonical CBOR ("sha256_cbor"). NONE_HASH is the hash
of PYTHONHASHSEED when that is set, else 32 random bytes per process: a restarted engine names the same
prefix differently. Extra keys: the LoRA adapter's name on every block, and the request's `cache_salt`
on the first. Events carry the digest's last 8 bytes as an unsigned 64-bit integer.

SGLang: SHA-256 over the parent page's digest (for a first page, an adapter's namespace) followed by
the page's token ids as 4-byte little-endian words; events carry the digest's first 8 bytes as a signed 64-bit integer.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
from collections.abc import Sequence
from typing import Any, Protocol

import cbor2


class BlockHasher(Protocol):
    def block(self, parent: bytes | None, tokens: tuple[int, ...], extra: tuple[Any, ...] | None) -> bytes: ...

    def wire(self, digest: bytes) -> int: ...


def _sha256_pickle(value: Any) -> bytes:
    return hashlib.sha256(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def _sha256_cbor(value: Any) -> bytes:
    return hashlib.sha256(cbor2.dumps(value, canonical=True)).digest()


VLLM_ALGORITHMS = {"sha256": _sha256_pickle, "sha256_cbor": _sha256_cbor}


class VllmHashes:
    def __init__(self, algorithm: str = "sha256", seed: str | None = None) -> None:
        self._fn = VLLM_ALGORITHMS[algorithm]
        seed = seed if seed is not None else os.environ.get("PYTHONHASHSEED")
        self.none_hash = os.urandom(32) if seed is None else self._fn(seed)

    def block(self, parent: bytes | None, tokens: tuple[int, ...], extra: tuple[Any, ...] | None) -> bytes:
        return self._fn((self.none_hash if parent is None else parent, tokens, extra))

    def wire(self, digest: bytes) -> int:
        return int.from_bytes(digest[-8:], "big")


class SglangHashes:
    def block(self, parent: bytes | None, tokens: tuple[int, ...], extra: tuple[Any, ...] | None) -> bytes:
        h = hashlib.sha256()
        if parent is not None:
            h.update(parent)
        elif extra:  # a LoRA adapter's chains start from its own namespace, as SGLang's extra key does
            h.update(hashlib.sha256(repr(extra).encode()).digest())
        h.update(struct.pack(f"<{len(tokens)}I", *tokens))
        return h.digest()

    def wire(self, digest: bytes) -> int:
        return int.from_bytes(digest[:8], "big", signed=True)


def extra_keys(index: int, lora: str | None, salt: str | None) -> tuple[Any, ...] | None:
    """vLLM's extra keys of the block at `index`: the adapter's name, and the salt on the first block."""
    keys: list[Any] = [lora] if lora else []
    if salt and index == 0:
        keys.append(salt)
    return tuple(keys) if keys else None


def extend_chain(chain: list[bytes], tokens: Sequence[int], block_size: int, hasher: BlockHasher,
                 lora: str | None = None, salt: str | None = None) -> None:
    """Append the hashes of the full blocks of `tokens` that `chain` does not cover yet."""
    while (len(chain) + 1) * block_size <= len(tokens):
        i = len(chain)
        block = tuple(tokens[i * block_size: (i + 1) * block_size])
        chain.append(hasher.block(chain[-1] if chain else None, block, extra_keys(i, lora, salt)))
