"""Prompt prefix blocks: chained 64-bit mmh3 hashes of fixed-size character blocks.

Each block's hash covers its parent's, so one hash names a whole prefix. The
chain starts from the model name under the deployment's seed: the same text
for two models, or in two deployments, never shares an entry, and Redis holds
hashes only, never prompt text.
"""

from __future__ import annotations

from typing import Any

import mmh3


def prompt_text(body: dict[str, Any]) -> str:
    """The text whose prefixes are hashed: messages rendered so earlier turns never change."""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for m in messages:
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            parts.append(f"<{m.get('role', '')}>{content if isinstance(content, str) else ''}")
        return "".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        return "".join(p if isinstance(p, str) else " ".join(map(str, p)) for p in prompt)
    return prompt if isinstance(prompt, str) else ""


def block_hashes(text: str, model: str, seed: int, block_chars: int, max_blocks: int) -> list[str]:
    """Hashes of the leading full blocks of `text`, as 16 hex digits each."""
    parent = mmh3.hash64(model.encode(), seed=seed, signed=False)[0]
    out: list[str] = []
    for i in range(min(len(text) // block_chars, max_blocks)):
        block = text[i * block_chars : (i + 1) * block_chars].encode("utf-8", "surrogatepass")
        parent = mmh3.hash64(parent.to_bytes(8, "little") + block, seed=seed, signed=False)[0]
        out.append(f"{parent:016x}")
    return out


def capacity_blocks(block_size: int, num_blocks: int, chars_per_token: float, block_chars: int,
                    default: int) -> int:
    """How many prefix blocks an endpoint's KV cache holds, from its cache_config_info."""
    if block_size <= 0 or num_blocks <= 0:
        return default
    return max(1, int(block_size * num_blocks * chars_per_token / block_chars))

