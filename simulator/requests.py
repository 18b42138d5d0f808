"""The request shapes vLLM's OpenAI server accepts, read into token prompts for the engine.

Chat messages (string or part-list content), completion prompts as text, token
ids or batches of either, embedding inputs in the same four forms, and the
Responses API's `input` and `instructions`. A shape vLLM refuses is a ValueError
whose message names the field.
"""

from __future__ import annotations

from typing import Any

from simulator.tokenizer import render_chat, render_response, tokenize


class BadShape(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def chat_prompts(body: dict[str, Any]) -> list[list[int]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadShape("messages", "`messages` must be a non-empty list.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadShape(f"messages[{i}]", f"`messages[{i}]` must be an object with a string `role`.")
        _check_content(m.get("content"), f"messages[{i}].content")
    return [tokenize(render_chat(messages))]


def prompt_prompts(value: Any, field: str) -> list[list[int]]:
    """OpenAI's four prompt forms: a string, token ids, or a batch of either."""
    if isinstance(value, str) and value:
        return [tokenize(value)]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) and p for p in value):
            return [tokenize(p) for p in value]
        if _is_ids(value):
            return [list(value)]
        if all(isinstance(p, list) and p and _is_ids(p) for p in value):
            return [list(p) for p in value]
    raise BadShape(field, f"`{field}` must be a string, a list of strings, token ids or lists of token ids.")


def response_prompts(body: dict[str, Any]) -> list[list[int]]:
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise BadShape("instructions", "`instructions` must be a string.")
    items = body.get("input")
    if isinstance(items, list) and items:
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise BadShape(f"input[{i}]", f"`input[{i}]` must be an object.")
            if item.get("type", "message") == "message":
                _check_content(item.get("content"), f"input[{i}].content")
    elif not (isinstance(items, str) and items):
        raise BadShape("input", "`input` must be a string or a non-empty list of items.")
    return [tokenize(render_response(body))]


def _check_content(content: Any, field: str) -> None:
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list) or not all(isinstance(p, dict) and isinstance(p.get("type"), str)
                                                 for p in content):
        raise BadShape(field, f"`{field}` must be a string or a list of content parts.")


def _is_ids(value: list[Any]) -> bool:
    return all(type(t) is int and t >= 0 for t in value)
