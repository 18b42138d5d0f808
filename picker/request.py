"""Reading an OpenAI-style request body by its path: the model, and the prompt whose prefix is hashed.

Every shape vLLM's and SGLang's OpenAI surface accepts is read here: chat
messages with string or part-list content, completion prompts as text, token
ids or batches of either, the Responses API's `input` and `instructions`, and
embedding inputs. Anything else is a BadRequest (or PayloadTooLarge) naming the
field; no other exception leaves this module, and the fuzz test holds it to that.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from picker.errors import BadRequest, PayloadTooLarge

MAX_TOKEN_ID = 2**32 - 1  # token ids are hashed as 32-bit words; no vocabulary comes near it


@dataclass(frozen=True)
class Prompt:
    """What the model reads first: text, or token ids (never both). A batch is placed as one
    request, so its first prompt's prefix decides; `work_*` count every prompt of it."""

    text: str = ""
    tokens: tuple[int, ...] = ()
    work_chars: int = 0
    work_tokens: int = 0


@dataclass(frozen=True)
class ParsedRequest:
    body: dict[str, Any]
    model: str
    prompt: Prompt


def parse_request(path: str, raw: bytes, max_bytes: int) -> ParsedRequest:
    body = _json_object(raw, max_bytes)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("The `model` field is required and must be a non-empty string.", param="model")
    reader = _READERS.get(path.split("?", 1)[0].rstrip("/"), _no_prompt)
    try:
        prompt = reader(body)
    except RecursionError:
        raise BadRequest("Request body is nested too deeply.") from None
    return ParsedRequest(body, model, prompt)


def _json_object(raw: bytes, max_bytes: int) -> dict[str, Any]:
    if len(raw) > max_bytes:
        raise PayloadTooLarge(f"Request body of {len(raw)} bytes exceeds the limit of {max_bytes} bytes.")
    if not raw.strip():
        raise BadRequest("Request body is empty; expected a JSON object.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"Request body is not valid UTF-8 (byte {exc.start}).") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"Request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}.") \
            from None
    except RecursionError:
        raise BadRequest("Request body is nested too deeply.") from None
    except ValueError as exc:  # e.g. an integer past Python's digit limit
        raise BadRequest(f"Request body is not valid JSON: {exc}.") from None
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object.")
    return body


# -- chat ----------------------------------------------------------------------------


def _chat(body: dict[str, Any]) -> Prompt:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("`messages` must be a non-empty list of message objects.", param="messages")
    return _text(_message(m, f"messages[{i}]") for i, m in enumerate(messages))


def _message(m: Any, where: str) -> str:
    """One turn, rendered so that earlier turns never change as a conversation grows."""
    if not isinstance(m, dict):
        raise BadRequest(f"`{where}` must be an object with `role` and `content`.", param=where)
    role = m.get("role")
    if not isinstance(role, str) or not role:
        raise BadRequest(f"`{where}.role` must be a non-empty string.", param=f"{where}.role")
    rendered = f"<{role}>" + _content(m.get("content"), f"{where}.content")
    tool_calls = m.get("tool_calls")
    if tool_calls is not None:
        if not isinstance(tool_calls, list):
            raise BadRequest(f"`{where}.tool_calls` must be a list.", param=f"{where}.tool_calls")
        rendered += _canonical(tool_calls)
    return rendered


def _content(content: Any, where: str) -> str:
    """String content, or a list of parts: text parts as their text, other parts (images,
    audio, files) as their canonical JSON, so the same attachment hashes the same."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise BadRequest(f"`{where}` must be a string or a list of content parts.", param=where)
    out = []
    for i, part in enumerate(content):
        at = f"{where}[{i}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise BadRequest(f"`{at}` must be an object with a string `type`.", param=at)
        if part["type"] in ("text", "input_text", "output_text"):
            text = part.get("text")
            if not isinstance(text, str):
                raise BadRequest(f"`{at}.text` must be a string.", param=f"{at}.text")
            out.append(text)
        else:
            out.append(_canonical(part))
    return "".join(out)


# -- completions and embeddings -----------------------------------------------------------


def _completion(body: dict[str, Any]) -> Prompt:
    return _prompt_field(body.get("prompt"), "prompt")


def _embedding(body: dict[str, Any]) -> Prompt:
    return _prompt_field(body.get("input"), "input")


def _prompt_field(value: Any, field: str) -> Prompt:
    """A string, token ids, or a batch of either (OpenAI's four prompt forms)."""
    if isinstance(value, str):
        return Prompt(text=value, work_chars=len(value))
    shapes = "a string, a list of strings, a list of token ids or a list of token-id lists"
    if not isinstance(value, list) or not value:
        raise BadRequest(f"`{field}` must be {shapes}.", param=field)
    first = value[0]
    if isinstance(first, str):
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise BadRequest(f"`{field}[{i}]` must be a string, as `{field}[0]` is.", param=f"{field}[{i}]")
        return Prompt(text=first, work_chars=sum(len(s) for s in value))
    if isinstance(first, list):
        batch = [_token_ids(item, f"{field}[{i}]") for i, item in enumerate(value)]
        return Prompt(tokens=batch[0], work_tokens=sum(len(t) for t in batch))
    tokens = _token_ids(value, field)
    return Prompt(tokens=tokens, work_tokens=len(tokens))


def _token_ids(value: Any, field: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise BadRequest(f"`{field}` must be a non-empty list of token ids.", param=field)
    for i, t in enumerate(value):
        if type(t) is not int or not 0 <= t <= MAX_TOKEN_ID:
            raise BadRequest(f"`{field}[{i}]` must be a token id (an integer from 0 to {MAX_TOKEN_ID}).",
                             param=f"{field}[{i}]")
    return tuple(value)


# -- Responses API ---------------------------------------------------------------------


def _response(body: dict[str, Any]) -> Prompt:
    parts = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise BadRequest("`instructions` must be a string.", param="instructions")
        parts.append("<system>" + instructions)
    items = body.get("input")
    if isinstance(items, str):
        parts.append("<user>" + items)
    elif isinstance(items, list) and items:
        parts.extend(_input_item(item, f"input[{i}]") for i, item in enumerate(items))
    else:
        raise BadRequest("`input` must be a string or a non-empty list of input items.", param="input")
    return _text(parts)


def _input_item(item: Any, where: str) -> str:
    if not isinstance(item, dict):
        raise BadRequest(f"`{where}` must be an input item object.", param=where)
    kind = item.get("type", "message")
    if not isinstance(kind, str):
        raise BadRequest(f"`{where}.type` must be a string.", param=f"{where}.type")
    if kind == "message":
        return _message(item, where)
    return f"<{kind}>" + _canonical(item)  # tool calls and their outputs, reasoning items


# -- shared -------------------------------------------------------------------------------


def _no_prompt(body: dict[str, Any]) -> Prompt:
    """Other paths are routed by model and load alone."""
    return Prompt()


def _text(parts: Any) -> Prompt:
    text = "".join(parts)
    return Prompt(text=text, work_chars=len(text))


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


_READERS: dict[str, Callable[[dict[str, Any]], Prompt]] = {
    "/v1/chat/completions": _chat,
    "/v1/completions": _completion,
    "/v1/embeddings": _embedding,
    "/v1/responses": _response,
}
