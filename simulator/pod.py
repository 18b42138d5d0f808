"""One simulated model-server pod: an engine, its metrics and its OpenAI-style HTTP API."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from simulator.block_hashes import SglangHashes, VllmHashes
from simulator.disaggregation import Bootstrap, BootstrapServer, KVReceiver, TransferFailed, bootstrap_of
from simulator.engine import Engine, Sequence
from simulator.kv_events import KvEventPublisher, KvEventsConfig
from simulator.lora import AdapterError, Adapters
from simulator.metrics import SGLangMetrics, VLLMMetrics
from simulator.physics import Physics
from simulator.requests import BadShape, chat_prompts, prompt_prompts, response_prompts
from simulator.tokenizer import tokenize


@dataclass(frozen=True)
class PodSpec:
    name: str
    host: str
    port: int
    runtime: str  # "vllm" or "sglang"
    model: str
    # vLLM's --enable-lora, --lora-modules (name -> path), --max-loras and --max-cpu-loras.
    enable_lora: bool = False
    lora_modules: tuple[tuple[str, str], ...] = ()
    max_loras: int = 1
    max_cpu_loras: int | None = None  # vLLM's default: max_loras
    # SGLang's --disaggregation-mode: "null" (both phases), "prefill" or "decode".
    disaggregation: str = "null"
    bootstrap_port: int = 8998  # SGLang's --disaggregation-bootstrap-port (a prefill pod serves it)
    bootstrap_timeout_s: float = 30.0  # how long a decode request waits for its prefill
    # KV-cache events (`--kv-events-config`; None: none published), their encoding ("array" or "map", as
    # vLLM releases differ), the data-parallel rank (offsets the ports) and vLLM's block-hash algorithm.
    kv_events: KvEventsConfig | None = None
    kv_events_encoding: str = "array"
    data_parallel_rank: int = 0
    hash_algorithm: str = "sha256"


def openai_error(status: int, message: str, err_type: str, param: str | None = None) -> web.Response:
    """The error body vLLM and SGLang answer with."""
    return web.json_response({"error": {"message": message, "type": err_type, "param": param, "code": status}},
                             status=status)


# Each endpoint's request body to the token prompts its engine runs.
_PROMPT_READERS: dict[str, Callable[[dict[str, Any]], list[list[int]]]] = {
    "chat": chat_prompts,
    "response": response_prompts,
    "completion": lambda body: prompt_prompts(body.get("prompt"), "prompt"),
    "embedding": lambda body: prompt_prompts(body.get("input"), "input"),
}


def _vector(tokens: list[int], dimensions: int = 16) -> list[float]:
    """A deterministic unit-range embedding of a prompt."""
    seed = str(tokens[:512])
    return [(zlib.crc32(f"{seed}:{d}".encode()) % 2001 - 1000) / 1000 for d in range(dimensions)]


class _BadRequest(Exception):
    def __init__(self, status: int, message: str, err_type: str, param: str | None = None) -> None:
        super().__init__(message)
        self.response = openai_error(status, message, err_type, param)


class SimulatedPod:
    def __init__(self, spec: PodSpec, physics: Physics) -> None:
        self.spec = spec
        self.physics = physics
        self.metrics = (
            SGLangMetrics(spec.model, physics) if spec.runtime == "sglang"
            else VLLMMetrics(spec.model, physics, spec.max_loras if spec.enable_lora else 0)
        )
        self.adapters = Adapters(spec.max_loras, spec.max_cpu_loras or spec.max_loras, physics.lora_load_s,
                                 physics.lora_activate_s, dict(spec.lora_modules)) if spec.enable_lora else None
        self.events = KvEventPublisher(spec.kv_events, spec.runtime, spec.host, spec.data_parallel_rank,
                                       spec.kv_events_encoding) if spec.kv_events is not None else None
        hasher = SglangHashes() if spec.runtime == "sglang" else VllmHashes(spec.hash_algorithm)
        self.engine = Engine(physics, self.metrics, self.adapters, cache_when_scheduled=spec.runtime != "sglang",
                             hasher=hasher, events=self.events)
        self._synthetic: list[Sequence] = []
        self.bootstrap = BootstrapServer(spec.bootstrap_timeout_s) if spec.disaggregation == "prefill" else None
        self.receiver = KVReceiver(spec.bootstrap_timeout_s, physics.kv_transfer_token_s,
                                   physics.kv_transfer_overhead_s, physics.time_scale) \
            if spec.disaggregation == "decode" else None
        self.rooms: list[dict[str, Any]] = []  # the last bootstrap rooms this pod served, for tests (/sim/rooms)

    @property
    def served_models(self) -> tuple[str, ...]:
        return (self.spec.model, *(self.adapters.paths if self.adapters else ()))

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._tag_pod], client_max_size=64 * 1024 * 1024)
        r = app.router
        r.add_post("/v1/chat/completions", self._chat)
        r.add_post("/v1/completions", self._completions)
        r.add_post("/v1/responses", self._responses)
        r.add_post("/v1/embeddings", self._embeddings)
        r.add_get("/v1/models", self._models)
        if self.adapters is not None:
            r.add_post("/v1/load_lora_adapter", self._load_adapter)
            r.add_post("/v1/unload_lora_adapter", self._unload_adapter)
        r.add_get("/health", self._health)
        r.add_get("/metrics", self._metrics)
        r.add_post("/reset_prefix_cache" if self.spec.runtime == "vllm" else "/flush_cache", self._reset_cache)
        r.add_post("/sim/load", self._add_load)
        r.add_get("/sim/rooms", self._rooms)
        r.add_get("/sim/lora", self._lora_counts)
        r.add_delete("/sim/load", self._clear_load)
        if self.spec.runtime == "sglang":
            for path in ("/get_model_info", "/model_info"):
                r.add_get(path, self._model_info)
            for path in ("/get_server_info", "/server_info"):
                r.add_get(path, self._server_info)
            r.add_get("/health_generate", self._health_generate)
        return app

    @web.middleware
    async def _tag_pod(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            response: web.StreamResponse = await handler(request)
        except web.HTTPException as exc:
            kind = "BadRequestError" if exc.status < 500 else "InternalServerError"
            response = openai_error(exc.status, exc.reason, kind)
        if not response.prepared:  # a stream tags itself before its first byte
            response.headers["x-inference-pod"] = self.spec.name
        return response

    # -- generation ------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "response")

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "embedding")

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        try:
            body = await self._parse(request)
            prompts = _PROMPT_READERS[kind](body)
        except _BadRequest as exc:
            return exc.response
        except BadShape as exc:
            return openai_error(400, str(exc), "BadRequestError", exc.field)
        max_tokens = 1 if kind == "embedding" else (body.get("max_completion_tokens") or body.get("max_tokens")
                                                    or body.get("max_output_tokens"))
        if not isinstance(max_tokens, int | None) or isinstance(max_tokens, bool) or (max_tokens or 1) < 1:
            return openai_error(400, "`max_tokens` must be a positive integer.", "BadRequestError", "max_tokens")
        longest = max(len(t) for t in prompts)
        if longest + (max_tokens or 1) > self.physics.max_model_len:
            return openai_error(400, f"This model's maximum context length is {self.physics.max_model_len} tokens. "
                                f"However, you requested {longest + (max_tokens or 1)} tokens.", "BadRequestError")
        salt = body.get("cache_salt")
        if salt is not None and (not isinstance(salt, str) or not salt):
            return openai_error(400, "`cache_salt` must be a non-empty string.", "BadRequestError", "cache_salt")
        try:
            bootstrap = bootstrap_of(body)
        except ValueError as exc:
            return openai_error(400, str(exc), "BadRequestError")
        mode = self.spec.disaggregation
        if mode != "null":
            if bootstrap is None:
                return openai_error(400, f"This server runs the {mode} side of prefill/decode disaggregation; the "
                                    "request needs bootstrap_host, bootstrap_port and bootstrap_room.",
                                    "BadRequestError")
            if len(prompts) != 1 or kind == "embedding":
                return openai_error(400, "Prefill/decode disaggregation serves one prompt per request.",
                                    "BadRequestError")
            self.rooms = [*self.rooms[-99:], {"room": bootstrap.room, "mode": mode,
                                              "bootstrap": f"{bootstrap.host}:{bootstrap.port}"}]
        if mode == "prefill":
            assert bootstrap is not None
            return await self._prefill(request, body, prompts[0], bootstrap)
        transferred = 0
        if mode == "decode":
            assert bootstrap is not None and self.receiver is not None
            try:
                await self.receiver.receive(bootstrap, len(prompts[0]))
            except TransferFailed as exc:
                return openai_error(503, f"KV cache transfer failed: {exc}.", "ServiceUnavailableError")
            transferred = len(prompts[0]) - 1
        prefix = {"chat": "chatcmpl-", "completion": "cmpl-", "response": "resp_", "embedding": "embd-"}[kind]
        seqs = []
        for tokens in prompts:
            # Without max_tokens the model "stops" after a length fixed by the prompt.
            length = int(max_tokens) if max_tokens else 16 + zlib.crc32(str(tokens[:64]).encode()) % 240
            seqs.append(Sequence(
                request_id=prefix + uuid.uuid4().hex, tokens=list(tokens), num_prompt=len(tokens), max_tokens=length,
                finish_reason="length" if max_tokens else "stop",
                adapter=body["model"] if body["model"] != self.spec.model else None, salt=salt, events=asyncio.Queue(),
                transferred=transferred))
        for seq in seqs:
            self.engine.submit(seq)
        try:
            if kind == "embedding":
                return await self._embed(seqs, body["model"])
            if body.get("stream") and kind == "response":
                return await self._stream_response(request, seqs[0], body["model"])
            if body.get("stream"):
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                return await self._stream(request, seqs, body["model"], kind == "chat", include_usage)
            if kind == "response":
                return await self._complete_response(seqs[0], body["model"])
            return await self._complete(seqs, body["model"], kind == "chat")
        finally:
            for seq in seqs:
                if seq.state != "done":
                    self.engine.abort(seq)

    async def _prefill(self, request: web.Request, body: dict[str, Any], tokens: list[int],
                       bootstrap: Bootstrap) -> web.Response:
        """Compute the prompt (and its first token), then hand the room to the decode pod."""
        assert self.bootstrap is not None
        seq = Sequence(request_id="prefill-" + uuid.uuid4().hex, tokens=list(tokens), num_prompt=len(tokens),
                       max_tokens=1, finish_reason="length", events=asyncio.Queue())
        self.engine.submit(seq)
        try:
            text = await self._text(seq)
        except BaseException:
            self.engine.abort(seq)
            self.bootstrap.fail(bootstrap.room, "the prefill request was cancelled")
            raise
        self.bootstrap.ready(bootstrap.room, seq.num_prompt)
        return web.json_response({"id": seq.request_id, "object": "text_completion", "created": int(time.time()),
                                  "model": body["model"], "choices": [{"index": 0, "text": text, "logprobs": None,
                                                                        "finish_reason": "length"}],
                                  "usage": self._usage(seq)})

    async def _lora_counts(self, request: web.Request) -> web.Response:
        """Adapter loads since start (no vLLM metric counts them), for benchmarks."""
        a = self.adapters
        return web.json_response({"loads": a.loads if a else 0, "activations": a.activations if a else 0,
                                  "resident": a.resident if a else []})

    async def _rooms(self, request: web.Request) -> web.Response:
        return web.json_response({"mode": self.spec.disaggregation, "rooms": self.rooms})

    async def _parse(self, request: web.Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise _BadRequest(400, "Request body is not valid JSON.", "BadRequestError") from None
        if not isinstance(body, dict):
            raise _BadRequest(400, "Request body must be a JSON object.", "BadRequestError")
        model = body.get("model")
        if not isinstance(model, str) or model not in self.served_models:
            raise _BadRequest(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        return body

    def _usage(self, seq: Sequence) -> dict[str, Any]:
        return {
            "prompt_tokens": seq.num_prompt,
            "total_tokens": seq.num_prompt + seq.generated,
            "completion_tokens": seq.generated,
            "prompt_tokens_details": {"cached_tokens": seq.cached_tokens},
        }

    @staticmethod
    async def _text(seq: Sequence) -> str:
        assert seq.events is not None
        pieces = []
        while (piece := await seq.events.get()) is not None:
            pieces.append(piece)
        return "".join(pieces)

    def _usage_of(self, seqs: list[Sequence]) -> dict[str, Any]:
        usages = [self._usage(s) for s in seqs]
        out = {k: sum(u[k] for u in usages) for k in ("prompt_tokens", "total_tokens", "completion_tokens")}
        return {**out, "prompt_tokens_details": {"cached_tokens": sum(s.cached_tokens for s in seqs)}}

    async def _complete(self, seqs: list[Sequence], model: str, chat: bool) -> web.Response:
        texts = await asyncio.gather(*(self._text(s) for s in seqs))
        choices = []
        for i, (seq, text) in enumerate(zip(seqs, texts, strict=True)):
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "reasoning_content": None,
                                                        "content": text, "tool_calls": []},
                                "logprobs": None, "finish_reason": seq.finish_reason, "stop_reason": None})
            else:
                choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": seq.finish_reason,
                                "stop_reason": None})
        return web.json_response({
            "id": seqs[0].request_id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices, "usage": self._usage_of(seqs),
        })

    async def _embed(self, seqs: list[Sequence], model: str) -> web.Response:
        await asyncio.gather(*(self._text(s) for s in seqs))  # the prefill is the work
        data = [{"object": "embedding", "index": i, "embedding": _vector(seq.tokens[:seq.num_prompt])}
                for i, seq in enumerate(seqs)]
        usage = {"prompt_tokens": sum(s.num_prompt for s in seqs), "total_tokens": sum(s.num_prompt for s in seqs)}
        return web.json_response({"object": "list", "data": data, "model": model, "usage": usage})

    def _response_object(self, seq: Sequence, model: str, text: str, status: str) -> dict[str, Any]:
        return {"id": seq.request_id, "object": "response", "created_at": int(time.time()), "model": model,
                "status": status, "output": [] if status != "completed" else [{
                    "type": "message", "id": "msg_" + seq.request_id[5:], "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}],
                "usage": {"input_tokens": seq.num_prompt, "output_tokens": seq.generated,
                          "total_tokens": seq.num_prompt + seq.generated,
                          "input_tokens_details": {"cached_tokens": seq.cached_tokens}}}

    async def _complete_response(self, seq: Sequence, model: str) -> web.Response:
        text = await self._text(seq)
        return web.json_response(self._response_object(seq, model, text, "completed"))

    async def _stream_response(self, request: web.Request, seq: Sequence, model: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "x-inference-pod": self.spec.name})
        await response.prepare(request)

        async def event(kind: str, **fields: Any) -> None:
            await response.write(f"event: {kind}\n".encode() + b"data: "
                                 + json.dumps({"type": kind, **fields}).encode() + b"\n\n")

        await event("response.created", response=self._response_object(seq, model, "", "in_progress"))
        assert seq.events is not None
        pieces = []
        while (piece := await seq.events.get()) is not None:
            pieces.append(piece)
            await event("response.output_text.delta", item_id="msg_" + seq.request_id[5:], output_index=0,
                        content_index=0, delta=piece)
        await event("response.completed", response=self._response_object(seq, model, "".join(pieces), "completed"))
        await response.write_eof()
        return response

    async def _stream(self, request: web.Request, seqs: list[Sequence], model: str, chat: bool,
                      include_usage: bool) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        response.headers["x-inference-pod"] = self.spec.name
        await response.prepare(request)
        created = int(time.time())
        base = {"id": seqs[0].request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": model}
        extra = {"usage": None} if include_usage else {}

        async def send(choices: list[dict[str, Any]], **fields: Any) -> None:
            await response.write(b"data: " + json.dumps({**base, "choices": choices, **fields}).encode() + b"\n\n")

        # A batch streams its prompts one after another, each under its own choice index.
        for index, seq in enumerate(seqs):
            if chat:
                await send([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}], **extra)
            assert seq.events is not None
            sent = 0
            while (piece := await seq.events.get()) is not None:
                sent += 1
                # The length is known up front, so the last piece carries finish_reason without waiting.
                finish = seq.finish_reason if sent >= seq.max_tokens else None
                if chat:
                    choice = {"index": index, "delta": {"content": piece}, "logprobs": None, "finish_reason": finish}
                else:
                    choice = {"index": index, "text": piece, "logprobs": None, "finish_reason": finish,
                              "stop_reason": None}
                await send([choice], **extra)
        if include_usage:
            await send([], usage=self._usage_of(seqs))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    # -- everything else -----------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        created = int(time.time())
        paths = self.adapters.paths if self.adapters else {}
        data = [{"id": m, "object": "model", "created": created, "owned_by": self.spec.runtime,
                 "root": paths.get(m, self.spec.model), "parent": None if m == self.spec.model else self.spec.model,
                 "max_model_len": self.physics.max_model_len} for m in self.served_models]
        return web.json_response({"object": "list", "data": data})

    async def _load_adapter(self, request: web.Request) -> web.Response:
        """vLLM's runtime LoRA loading: registers the adapter; its weights load when a request needs them."""
        return await self._change_adapter(request, load=True)

    async def _unload_adapter(self, request: web.Request) -> web.Response:
        return await self._change_adapter(request, load=False)

    async def _change_adapter(self, request: web.Request, load: bool) -> web.Response:
        assert self.adapters is not None
        try:
            body = json.loads(await request.read() or b"{}")
            name, path = str(body.get("lora_name") or ""), str(body.get("lora_path") or "")
        except (ValueError, AttributeError):
            return openai_error(400, "Expected a JSON object with lora_name" + (" and lora_path." if load else "."),
                                "BadRequestError")
        try:
            if load:
                self.adapters.add(name, path)
            else:
                self.adapters.remove(name)
        except AdapterError as exc:
            return openai_error(400, str(exc), "InvalidUserInput") if load else \
                openai_error(404, str(exc), "NotFoundError")
        return web.Response(text=f"Success: LoRA adapter '{name}' {'added' if load else 'removed'} successfully.")

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _health_generate(self, request: web.Request) -> web.Response:
        seq = Sequence(request_id="health-" + uuid.uuid4().hex, tokens=tokenize("ping"), num_prompt=1,
                       max_tokens=1, finish_reason="length", events=asyncio.Queue())
        self.engine.submit(seq)
        assert seq.events is not None
        while await seq.events.get() is not None:
            pass
        return web.Response(status=200)

    async def _metrics(self, request: web.Request) -> web.Response:
        self.metrics.refresh(self.engine)
        if isinstance(self.metrics, SGLangMetrics):
            self.metrics.refresh_disaggregation(self.bootstrap, self.receiver)
        return web.Response(body=self.metrics.render(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def _model_info(self, request: web.Request) -> web.Response:
        return web.json_response({"model_path": self.spec.model, "tokenizer_path": self.spec.model,
                                  "is_generation": True, "preferred_sampling_params": None})

    async def _server_info(self, request: web.Request) -> web.Response:
        p = self.physics
        return web.json_response({
            "model_path": self.spec.model, "served_model_name": self.spec.model, "host": self.spec.host,
            "port": self.spec.port, "page_size": p.block_size, "max_running_requests": p.max_num_seqs,
            "chunked_prefill_size": p.max_batched_tokens, "context_length": p.max_model_len,
            "max_total_num_tokens": p.num_blocks * p.block_size,
            "disaggregation_mode": self.spec.disaggregation,
            "internal_states": [{"last_gen_throughput": 0.0}], "version": "sim",
        })

    async def _reset_cache(self, request: web.Request) -> web.Response:
        """A prefix-cache reset: every cached block forgotten (AllBlocksCleared); refused while requests run."""
        if not self.engine.reset_prefix_cache():
            return openai_error(400, "The prefix cache cannot be reset while requests hold blocks.",
                                "BadRequestError")
        return web.Response(status=200)

    async def _add_load(self, request: web.Request) -> web.Response:
        """Artificial load: synthetic sequences that occupy batch slots and KV blocks for real."""
        try:
            spec = json.loads(await request.read() or b"{}")
            count, prompt, output = int(spec.get("requests", 32)), int(spec.get("prompt_tokens", 1024)), \
                int(spec.get("max_tokens", 100_000))
            adapter = spec.get("adapter")
        except (ValueError, TypeError, AttributeError):
            return openai_error(400, "Expected {\"requests\", \"prompt_tokens\", \"max_tokens\"} integers.",
                                "BadRequestError")
        if adapter is not None and adapter not in self.served_models[1:]:
            return openai_error(404, f"The adapter `{adapter}` is not served here.", "NotFoundError", "adapter")
        for _ in range(count):
            tokens = tokenize(" ".join(f"load{len(self._synthetic)}x{j}" for j in range(prompt)))[:prompt]
            seq = Sequence(request_id=f"load-{uuid.uuid4().hex}", tokens=tokens, num_prompt=len(tokens),
                           max_tokens=output, finish_reason="length", adapter=adapter)
            self._synthetic.append(seq)
            self.engine.submit(seq)
        return web.json_response({"synthetic_requests": len(self._synthetic)})

    async def _clear_load(self, request: web.Request) -> web.Response:
        for seq in self._synthetic:
            self.engine.abort(seq)
        self._synthetic.clear()
        return web.json_response({"synthetic_requests": 0})
