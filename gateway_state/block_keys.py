"""Our own key for a block of token ids: what the prefix index is keyed by, whoever writes it.

A block's key is a 64-bit mmh3 hash of its parent's key and its token ids (as 32-bit words, after a
marker byte), under the deployment's seed, so one key names a whole prefix and Redis never holds a
token. Pickers compute it from a request's tokens; collectors from the token ids an engine's KV-cache
events carry, chaining through the parents the events name. Nothing depends on the engine's own hash
algorithm or seed: the engine's hash is only an opaque per-endpoint name for a block
(`keys.kv_blocks`), so removals and parents can be found.

Where a chain starts: a prompt's model in the approximate index (the same prompt for two models
never shares an entry); in the index built from engine events, what the engine's cache is keyed by
besides tokens: the LoRA adapter's name and the request's cache salt (an engine's cache does not
know the name a client used for its base model).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import mmh3

TOKENS = b"\x01"  # marks a block of token ids (text blocks carry none)


def text_root(model: str, seed: int) -> int:
    return int(mmh3.hash64(model.encode("utf-8", "surrogatepass"), seed=seed, signed=False)[0])


def engine_root(lora: str | None, salt: str | None, seed: int) -> int:
    name = b"engine\x00" + (lora or "").encode("utf-8", "surrogatepass") + b"\x00" + \
        (salt or "").encode("utf-8", "surrogatepass")
    return int(mmh3.hash64(name, seed=seed, signed=False)[0])


def token_block(parent: int, tokens: Sequence[int], seed: int) -> int:
    data = parent.to_bytes(8, "little") + TOKENS + struct.pack(f"<{len(tokens)}I", *tokens)
    return int(mmh3.hash64(data, seed=seed, signed=False)[0])


def token_keys(root: int, tokens: Sequence[int], block_size: int, max_blocks: int, seed: int) -> list[str]:
    """Keys of the leading full blocks of `tokens`, as 16 hex digits each."""
    out: list[str] = []
    parent = root
    for i in range(min(len(tokens) // block_size, max_blocks)):
        parent = token_block(parent, tokens[i * block_size: (i + 1) * block_size], seed)
        out.append(f"{parent:016x}")
    return out


def hex_key(key: int) -> str:
    return f"{key:016x}"
