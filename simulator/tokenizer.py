"""A deterministic tokenizer that needs no download.

A token is a word or a single symbol together with the whitespace before it, so
`detokenize(tokenize(s)) == s` for any text and generated text re-tokenizes into
the same ids: a conversation's next turn reuses the cached blocks of the last
answer, as it does on a real server.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from typing import Any

_PIECE = re.compile(r"\s*[A-Za-z0-9]+|\s*[^\sA-Za-z0-9]|\s+")

# Words the simulated model "generates"; each is one token with its leading space.
_OUTPUT_WORDS = (
    " the", " model", " answers", " with", " simulated", " tokens", " for", " routing",
    " tests", " and", " every", " word", " is", " one", " token", " here",
)


def tokenize(text: str) -> list[int]:
    return [zlib.crc32(p.encode("utf-8", "surrogatepass")) for p in _PIECE.findall(text)]


def output_piece(seed: int, index: int) -> str:
    """The index-th generated piece of a sequence; deterministic per seed."""
    return _OUTPUT_WORDS[(seed + index * 7) % len(_OUTPUT_WORDS)]


def render_chat(messages: Sequence[dict[str, Any]]) -> str:
    """A ChatML-style template, with the generation prompt appended."""
    parts = []
    for m in messages:
        content = m.get("content") or ""
        if isinstance(content, list):  # OpenAI content parts; other parts (images) count as their text form
            content = "".join(p["text"] if isinstance(p.get("text"), str) else str(p) for p in content
                              if isinstance(p, dict))
        parts.append(f"<|im_start|>{m.get('role', 'user')}\n{content}<|im_end|>\n")
    parts.append("<|im_start|>assistant\n")
    return "".join(parts)
