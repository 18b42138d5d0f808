"""Prompt prefix blocks: chained 64-bit mmh3 hashes of fixed-size blocks of text or token ids.

Each block's hash covers its parent's, so one hash names a whole prefix. The
chain starts from the model name under the deployment's seed: the same prompt
for two models, or in two deployments, never shares an entry, and Redis holds
hashes only, never prompt text. Token-id prompts hash their ids as 32-bit words
in blocks of about as many tokens as a text block holds, so two requests sharing
a token prefix share blocks; a marker byte keeps the two kinds from colliding.
"""

from __future__ import annotations

import mmh3

from gateway_state.block_keys import text_root, token_keys
from picker.request import Prompt


def block_hashes(prompt: Prompt, model: str, seed: int, block_chars: int, block_tokens: int,
                 max_blocks: int) -> list[str]:
    """Hashes of the prompt's leading full blocks, as 16 hex digits each."""
    parent = text_root(model, seed)
    if prompt.tokens:
        return token_keys(parent, prompt.tokens, block_tokens, max_blocks, seed)
    out: list[str] = []
    text = prompt.text
    for i in range(min(len(text) // block_chars, max_blocks)):
        block = text[i * block_chars: (i + 1) * block_chars].encode("utf-8", "surrogatepass")
        parent = mmh3.hash64(parent.to_bytes(8, "little") + block, seed=seed, signed=False)[0]
        out.append(f"{parent:016x}")
    return out


def work_blocks(prompt: Prompt, block_chars: int, block_tokens: int) -> int:
    """The whole prompt (every prompt of a batch) in blocks, uncapped: its prefill where nothing is cached."""
    return -(-prompt.work_chars // block_chars) + -(-prompt.work_tokens // block_tokens)


def capacity_blocks(block_size: int, num_blocks: int, chars_per_token: float, block_chars: int,
                    default: int) -> int:
    """How many prefix blocks an endpoint's KV cache holds, from its cache_config_info."""
    if block_size <= 0 or num_blocks <= 0:
        return default
    return max(1, int(block_size * num_blocks * chars_per_token / block_chars))
