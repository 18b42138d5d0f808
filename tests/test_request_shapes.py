"""Every request shape real clients send is read, hashed by its prefix, or refused with a 400 naming the field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from picker.errors import BadRequest, PayloadTooLarge
from picker.prefix import block_hashes, work_blocks
from picker.request import Prompt, parse_request

CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES = "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"


def parse(path: str, body: Any) -> Prompt:
    return parse_request(path, json.dumps(body).encode(), 1 << 20).prompt


def hashes(prompt: Prompt, model: str = "m", seed: int = 1) -> list[str]:
    return block_hashes(prompt, model, seed, 64, 16, 256)


def test_chat_turns_render_so_a_conversation_keeps_its_prefix() -> None:
    turn1 = {"model": "m", "messages": [{"role": "user", "content": "x" * 200}]}
    turn2 = {"model": "m", "messages": [*turn1["messages"], {"role": "assistant", "content": "y" * 100}]}
    h1, h2 = hashes(parse(CHAT, turn1)), hashes(parse(CHAT, turn2))
    assert len(h1) == 3 and h2[:3] == h1 and len(h2) == 4
    assert hashes(parse(CHAT, turn1), model="other")[0] != h1[0]
    assert hashes(parse(CHAT, turn1), seed=2)[0] != h1[0]
    assert len(hashes(Prompt(text="z" * 64 * 300))) == 256


def test_content_parts_and_string_content_of_the_same_text_hash_alike() -> None:
    text = "a long system prompt " * 20
    plain = parse(CHAT, {"model": "m", "messages": [{"role": "user", "content": text}]})
    parts = parse(CHAT, {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": text[:50]}, {"type": "text", "text": text[50:]}]}]})
    assert plain == parts
    image = parse(CHAT, {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, {"type": "text", "text": "hi"}]}]})
    assert "data:image/png;base64,AAAA" in image.text
    tools = parse(CHAT, {"model": "m", "messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]})
    assert tools.text.startswith("<assistant>") and '"name":"f"' in tools.text


def test_token_id_prompts_share_blocks_when_they_share_a_token_prefix() -> None:
    shared = list(range(100, 164))  # four blocks of 16 ids
    a = parse(COMPLETIONS, {"model": "m", "prompt": shared + [1, 2, 3] * 10})
    b = parse(COMPLETIONS, {"model": "m", "prompt": shared + [7] * 40})
    assert a.tokens[:64] == tuple(shared)
    ha, hb = hashes(a), hashes(b)
    assert ha[:4] == hb[:4] and ha[4] != hb[4]
    # Ids hash as ids: the same digits as text share nothing with them.
    assert not set(hashes(Prompt(text=" ".join(map(str, shared))))) & set(ha)
    batch = parse(COMPLETIONS, {"model": "m", "prompt": [shared + [9] * 16, [1, 2]]})
    assert hashes(batch)[:4] == ha[:4] and batch.work_tokens == 82
    assert work_blocks(batch, 64, 16) == 6


def test_batches_of_strings_embeddings_and_the_responses_api() -> None:
    batch = parse(COMPLETIONS, {"model": "m", "prompt": ["first " * 20, "second"]})
    assert batch.text == "first " * 20 and batch.work_chars == 126
    assert parse(EMBEDDINGS, {"model": "m", "input": "embed me"}).text == "embed me"
    assert parse(EMBEDDINGS, {"model": "m", "input": [[5, 6, 7]]}).tokens == (5, 6, 7)
    simple = parse(RESPONSES, {"model": "m", "input": "hello", "instructions": "be brief"})
    assert simple.text == "<system>be brief<user>hello"
    items = parse(RESPONSES, {"model": "m", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "hello"}]},
        {"type": "function_call_output", "call_id": "c1", "output": "42"}]})
    assert items.text.startswith("<user>hello<function_call_output>")
    # Other paths route by model and load alone.
    assert parse("/v1/audio/speech", {"model": "m", "input": 5}) == Prompt()


@pytest.mark.parametrize(("path", "body", "param"), [
    (COMPLETIONS, {"model": "m", "prompt": [1, "a", None]}, "prompt[1]"),
    (COMPLETIONS, {"model": "m", "prompt": [1, -2]}, "prompt[1]"),
    (COMPLETIONS, {"model": "m", "prompt": [1, True]}, "prompt[1]"),
    (COMPLETIONS, {"model": "m", "prompt": [1, 2**40]}, "prompt[1]"),
    (COMPLETIONS, {"model": "m", "prompt": [[1], []]}, "prompt[1]"),
    (COMPLETIONS, {"model": "m", "prompt": ["a", 1]}, "prompt[1]"),
    (COMPLETIONS, {"model": "m", "prompt": []}, "prompt"),
    (COMPLETIONS, {"model": "m", "prompt": {"text": "x"}}, "prompt"),
    (COMPLETIONS, {"model": "m"}, "prompt"),
    (CHAT, {"model": "m", "messages": [1, 2, 3]}, "messages[0]"),
    (CHAT, {"model": "m", "messages": []}, "messages"),
    (CHAT, {"model": "m", "messages": "hi"}, "messages"),
    (CHAT, {"model": "m", "messages": [{"content": "x"}]}, "messages[0].role"),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": [{"text": "x"}]}]}, "messages[0].content[0]"),
    (CHAT, {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
     "messages[0].content[0].text"),
    (CHAT, {"model": "m", "messages": [{"role": "assistant", "tool_calls": {}}]}, "messages[0].tool_calls"),
    (RESPONSES, {"model": "m", "input": 5}, "input"),
    (RESPONSES, {"model": "m", "input": "x", "instructions": ["x"]}, "instructions"),
    (RESPONSES, {"model": "m", "input": [1]}, "input[0]"),
    (EMBEDDINGS, {"model": "m", "input": None}, "input"),
    (CHAT, {"model": 5, "messages": []}, "model"),
    (CHAT, {"messages": []}, "model"),
])
def test_bad_shapes_are_a_400_naming_the_field(path: str, body: Any, param: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse(path, body)
    assert caught.value.param == param and param.split("[")[0].split(".")[0] in caught.value.message


@pytest.mark.parametrize("raw", [
    b"", b"  ", b"[1, 2]", b"\xff\xfe", b"{", b'{"model": "m"', b"[" * 100_000 + b"]" * 100_000,
    b'{"model": "m", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", b'{"n": ' + b"9" * 5000 + b"}",
])
def test_unreadable_bodies_are_a_400(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_request(CHAT, raw, 1 << 20)


def test_a_body_over_the_limit_is_a_413() -> None:
    with pytest.raises(PayloadTooLarge):
        parse_request(CHAT, b'{"model": "m", "prompt": "' + b"x" * 100 + b'"}', 64)
