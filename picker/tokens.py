"""A request's prompt as its engine's token ids, for pools whose prefix index comes from engine events.

The engine's cache is keyed by the token ids it computes, so the picker computes the same ones: the
model's own tokenizer and chat template (`tokenization/`), given what the engine's OpenAI server gives
the template for each request shape (`tokenization/openai_shapes.py`). Chat messages render through
the template; completion and embedding prompts tokenize as they are (token ids as given; a batch by its
first prompt, as it is placed as one request); the Responses API renders as its chat.

Each model's tokenizer comes from a path: its GGUF file (computing as llama.cpp does), or its Hugging Face
directory with `tokenizer.json` and `tokenizer_config.json` (as vLLM and SGLang do). A request whose model
has none configured, or that the tokenizer cannot take (an image part, a template error), gets no token
ids: it is routed by load alone in such a pool, and counted (`picker_prompt_untokenized_total`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenization.model_tokenizer import ChatTemplateError, ModelTokenizer, UnsupportedTokenizer, for_model
from tokenization.openai_shapes import chat_messages, response_messages

log = logging.getLogger("picker.tokens")

ANY_MODEL = ""  # the tokenizer of every model not named


class EngineTokens:
    def __init__(self, paths: Mapping[str, str]) -> None:
        """`paths`: model name -> tokenizer path (ANY_MODEL for the rest). Each is loaded now, once."""
        self._tokenizers: dict[str, ModelTokenizer] = {}
        for model, path in paths.items():
            started = time.perf_counter()
            self._tokenizers[model] = for_model(Path(path))
            log.info("tokenizer of %s from %s in %.2f s", model or "every model", path, time.perf_counter() - started)

    def __bool__(self) -> bool:
        return bool(self._tokenizers)

    def ids(self, path: str, body: dict[str, Any], model: str) -> list[int] | None:
        """The prompt's token ids as `model`'s engine computes them; None when they cannot be known.
        `body` is a request already validated by picker/request.py."""
        tokenizer = self._tokenizers.get(model) or self._tokenizers.get(ANY_MODEL)
        if tokenizer is None:
            return None
        endpoint = path.split("?", 1)[0].rstrip("/")
        try:
            if endpoint == "/v1/chat/completions":
                return tokenizer.chat_ids(chat_messages(body["messages"]))
            if endpoint == "/v1/responses":
                return tokenizer.chat_ids(response_messages(body))
            if endpoint in ("/v1/completions", "/v1/embeddings"):
                return _prompt_ids(tokenizer, body.get("prompt" if endpoint == "/v1/completions" else "input"))
        except (UnsupportedTokenizer, ChatTemplateError) as exc:
            log.debug("no token ids for a %s request: %s", endpoint, exc)
        return None


def _prompt_ids(tokenizer: ModelTokenizer, value: Any) -> list[int] | None:
    first = value[0] if isinstance(value, list) and value and isinstance(value[0], str | list) else value
    if isinstance(first, str):
        return tokenizer.prompt_ids(first)
    if isinstance(first, list):
        return list(first)
    return None
