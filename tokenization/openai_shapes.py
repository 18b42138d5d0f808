"""What an engine's OpenAI server gives the chat template for each request shape.

Chat messages go as they are (text parts joined, see `ChatMessage.of`). The Responses API's
`instructions` become a system turn, a string `input` a user turn, message items their role's turn,
and any other item (a tool call, its output, reasoning) a `tool` turn holding the item's canonical
JSON. The simulator computes its prompts with these, and the picker computes the same token ids
from the same body; tests/test_llama_cpp.py holds both to llama.cpp.

Bodies reach here validated (each caller checks shapes and answers a 400 naming the field).
"""

from __future__ import annotations

import json
from typing import Any

from tokenization.model_tokenizer import ChatMessage


def chat_messages(messages: list[dict[str, Any]]) -> list[ChatMessage]:
    return [ChatMessage.of(m) for m in messages]


def response_messages(body: dict[str, Any]) -> list[ChatMessage]:
    out = []
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        out.append(ChatMessage("system", instructions))
    items = body.get("input")
    if isinstance(items, str):
        out.append(ChatMessage("user", items))
        return out
    for item in items or ():
        if item.get("type", "message") == "message":
            out.append(ChatMessage.of({"role": str(item.get("role", "user")), "content": item.get("content")}))
        else:
            out.append(ChatMessage("tool", json.dumps(item, sort_keys=True, separators=(",", ":"),
                                                      ensure_ascii=False)))
    return out
