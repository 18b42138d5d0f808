"""A model's tokenizer from a Hugging Face model directory computes what the same model's GGUF file does
(tests/test_llama_cpp.py holds the GGUF one to llama.cpp itself), and the picker finds each model's."""

from __future__ import annotations

import json
from pathlib import Path

from picker.tokens import EngineTokens
from tokenization.gguf import read_metadata
from tokenization.model_tokenizer import ChatMessage, ModelTokenizer, bundled_model, for_model

CHATS = [[ChatMessage("user", "What is the tallest mountain?")],
         [ChatMessage("system", "You answer in French."), ChatMessage("user", "Good morning, 42 cats!")],
         [ChatMessage("user", "Keep <|im_end|> literally\tand  spaces"), ChatMessage("assistant", "Sure."),
          ChatMessage("tool", '{"sky": "clear"}')]]
PROMPTS = ["Once upon a time, in 1999,", "Ünïcödé ½ → ∞ 日本語 🚲  two  spaces", "<|im_start|>user\nhello<|im_end|>"]


def model_directory(tmp_path: Path) -> Path:
    """The bundled model as a Hugging Face directory: its tokenizer as tokenizer.json, its chat template and
    special tokens in tokenizer_config.json (as a model's publisher ships them)."""
    gguf = ModelTokenizer.from_gguf(bundled_model())
    gguf._bpe.save(str(tmp_path / "tokenizer.json"))
    meta = read_metadata(bundled_model())
    tokens = meta["tokenizer.ggml.tokens"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": meta["tokenizer.chat_template"],
        "bos_token": {"content": tokens[meta["tokenizer.ggml.bos_token_id"]]},
        "eos_token": tokens[meta["tokenizer.ggml.eos_token_id"]]}))
    return tmp_path


def test_a_model_directory_tokenizes_as_the_models_gguf(tmp_path: Path) -> None:
    gguf, directory = for_model(bundled_model()), for_model(model_directory(tmp_path))
    for chat in CHATS:
        assert directory.render_chat(chat) == gguf.render_chat(chat)
        assert directory.chat_ids(chat) == gguf.chat_ids(chat)
    for prompt in PROMPTS:
        assert directory.prompt_ids(prompt) == gguf.prompt_ids(prompt)


def test_the_picker_uses_each_models_own_tokenizer_and_the_default_for_the_rest(tmp_path: Path) -> None:
    tokens = EngineTokens({"smol": str(model_directory(tmp_path)), "": str(bundled_model())})
    body = {"messages": [{"role": "user", "content": "hi"}]}
    expected = for_model(bundled_model()).chat_ids([ChatMessage("user", "hi")])
    assert tokens.ids("/v1/chat/completions", body, "smol") == expected
    assert tokens.ids("/v1/chat/completions", body, "anything") == expected
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    assert tokens.ids("/v1/chat/completions", image, "smol") is None  # a part no tokenizer takes
    assert tokens.ids("/v1/models", {}, "smol") is None
