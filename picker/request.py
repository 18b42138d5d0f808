"""Parsing an OpenAI-style request body; every failure is a clear 4xx."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from picker.errors import BadRequest, PayloadTooLarge


@dataclass(frozen=True)
class ParsedRequest:
    body: dict[str, Any]
    model: str


def parse_body(raw: bytes, max_bytes: int) -> ParsedRequest:
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
        where = f"line {exc.lineno} column {exc.colno}"
        raise BadRequest(f"Request body is not valid JSON: {exc.msg} at {where}.") from None
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("The `model` field is required and must be a string.", param="model")
    return ParsedRequest(body, model)
