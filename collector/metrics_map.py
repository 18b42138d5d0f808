"""Map vLLM's, SGLang's or llama.cpp's Prometheus text (and llama.cpp's /slots) to one LoadSample, by the
metric names as the servers emit them."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import replace
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from gateway_state.records import LoadSample

Series = dict[str, list[tuple[dict[str, str], float]]]


class GarbledMetrics(ValueError):
    """The text is not Prometheus exposition format, or has none of the servers' metrics."""


# The series to_load_sample reads. A model server exports hundreds of others (histogram buckets
# most of all); the parser never sees them. The collector of 4 idle pods scraped every 100 ms
# went from 15% to 7% of a core with that.
READ = frozenset({
    "vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc", "vllm:lora_requests_info", "vllm:cache_config_info", "vllm:prompt_tokens_total",
    "vllm:prefix_cache_hits_total",
    "sglang:num_queue_reqs", "sglang:num_running_reqs", "sglang:token_usage", "sglang:cache_config_info",
    "sglang:page_size", "sglang:num_pages", "sglang:max_total_num_tokens", "sglang:prompt_tokens_total",
    "sglang:cached_tokens_total",
    "llamacpp:requests_processing", "llamacpp:requests_deferred", "llamacpp:prompt_tokens_total",
    "llamacpp:prompt_tokens_cached_total",
})

# What llama.cpp's server does not report, for the scorers that would read it (LoadSample.unreported).
LLAMA_CPP_UNREPORTED = ("block_size", "num_blocks", "adapters")
LLAMA_CPP_WITHOUT_SLOTS = ("kv_cache_usage", "batch_limit")


def is_llama_cpp(text: str) -> bool:
    """A llama.cpp server's page: its load is completed from its /slots (kv_cache_usage, batch limit)."""
    return "llamacpp:requests_processing" in text


# One sample line of the exposition format: name, optional labels, value, optional timestamp.
_SAMPLE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)'  # name
                     r'(?:\{((?:[^"}]|"(?:[^"\\]|\\.)*")*)\})?'  # labels, their values quoted and escaped
                     r'[ \t]+(\S+)(?:[ \t]+-?\d+)?[ \t]*')  # value, timestamp
_LABEL = re.compile(r'[ \t]*([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"((?:[^"\\]|\\.)*)"[ \t]*(?:,|$)')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def _sample(line: str) -> tuple[str, dict[str, str], float]:
    """A sample line the way Prometheus reads it; ValueError when it is not one."""
    m = _SAMPLE.fullmatch(line)
    if m is None:
        raise ValueError(f"not a sample line: {line[:80]!r}")
    name, raw_labels, value = m.groups()
    labels: dict[str, str] = {}
    if raw_labels and raw_labels.strip():
        at = 0
        while at < len(raw_labels):
            lm = _LABEL.match(raw_labels, at)
            if lm is None or lm.end() == at:
                raise ValueError(f"bad labels: {raw_labels[:80]!r}")
            labels[lm.group(1)] = re.sub(r"\\[\\\"n]", lambda e: _UNESCAPE[e.group(0)], lm.group(2))
            at = lm.end()
    return name, labels, float(value)


def parse_series(text: str) -> Series:
    """The series in READ, each sample line parsed on its own (the page has hundreds of others, which only
    a page without any of these is checked for being metrics at all)."""
    series: Series = defaultdict(list)
    try:
        for line in text.splitlines():
            if line[:1] != "#" and line.partition("{")[0].partition(" ")[0] in READ:
                name, labels, value = _sample(line.strip())
                series[name].append((labels, value))
        if not series:  # nothing read: whether the page is metrics at all takes the whole parse, here only
            for _ in text_string_to_metric_families(text):
                pass
    except (ValueError, TypeError, IndexError) as exc:
        raise GarbledMetrics(f"unparsable metrics: {exc}") from None
    return series


def _total(series: Series, name: str) -> float | None:
    values = [v for _, v in series.get(name, ())]
    return sum(values) if values else None


def _highest(series: Series, name: str) -> float | None:
    values = [v for _, v in series.get(name, ())]
    return max(values) if values else None


def _labels(series: Series, name: str) -> dict[str, str]:
    """Labels of the series with the highest value (info metrics valued by timestamp)."""
    rows = series.get(name)
    return max(rows, key=lambda row: row[1])[0] if rows else {}


def _int(value: str | None) -> int:
    try:
        return int(float(value)) if value not in (None, "", "None") else 0
    except ValueError:
        return 0


def to_load_sample(text: str, now_ms: int, slots: list[dict[str, Any]] | None = None) -> LoadSample:
    """The load in a server's /metrics text; for llama.cpp, `slots` is its /slots answer (None: not read)."""
    series = parse_series(text)
    if "vllm:num_requests_waiting" in series:
        # vLLM: one series per engine (data-parallel ranks add up).
        kv = _highest(series, "vllm:kv_cache_usage_perc")
        if kv is None:
            kv = _highest(series, "vllm:gpu_cache_usage_perc")  # before 0.9.2
        lora = _labels(series, "vllm:lora_requests_info")
        cache = _labels(series, "vllm:cache_config_info")
        return LoadSample(
            scraped_at_ms=now_ms,
            ok=True,
            waiting=_total(series, "vllm:num_requests_waiting") or 0.0,
            running=_total(series, "vllm:num_requests_running") or 0.0,
            kv_cache_usage=kv or 0.0,
            running_adapters=tuple(a for a in lora.get("running_lora_adapters", "").split(",") if a),
            waiting_adapters=tuple(a for a in lora.get("waiting_lora_adapters", "").split(",") if a),
            max_adapters=_int(lora.get("max_lora")),
            base_model=next((labels.get("model_name", "") for labels, _ in series["vllm:num_requests_waiting"]), ""),
            block_size=_int(cache.get("block_size")),
            num_blocks=_int(cache.get("num_gpu_blocks")),
            prompt_tokens=_total(series, "vllm:prompt_tokens_total") or 0.0,
            cached_prompt_tokens=_total(series, "vllm:prefix_cache_hits_total") or 0.0,
        )
    if "sglang:num_queue_reqs" in series:
        # SGLang: tensor-parallel ranks report the same scheduler, so take one figure.
        block_size, num_blocks = _sglang_capacity(series)
        return LoadSample(
            scraped_at_ms=now_ms,
            ok=True,
            waiting=_highest(series, "sglang:num_queue_reqs") or 0.0,
            running=_highest(series, "sglang:num_running_reqs") or 0.0,
            kv_cache_usage=_highest(series, "sglang:token_usage") or 0.0,
            block_size=block_size,
            num_blocks=num_blocks,
            prompt_tokens=_highest(series, "sglang:prompt_tokens_total") or 0.0,
            cached_prompt_tokens=_highest(series, "sglang:cached_tokens_total") or 0.0,
        )
    if "llamacpp:requests_processing" in series:
        return _llama_cpp(series, slots, now_ms)
    raise GarbledMetrics("no vLLM, SGLang or llama.cpp queue metrics found")


def _llama_cpp(series: Series, slots: list[dict[str, Any]] | None, now_ms: int) -> LoadSample:
    """llama.cpp's server: a fixed number of slots, each with its own context and prompt cache.

    Its prompt-token counter excludes the tokens it reused from a slot's cache (vLLM's and SGLang's
    count them), so the sample's `prompt_tokens` adds them back. It exports no KV-cache gauge; /slots
    gives each slot's context and the tokens it holds, so the cache in use is the busy slots' tokens over
    every slot's context (idle slots keep their prompt for reuse, as vLLM's freed blocks stay cached until
    reallocated, and count as free). The slot count is the batch it runs without queueing (a request beyond
    it is deferred). It has no KV blocks to count and reports no LoRA adapters."""
    computed = _total(series, "llamacpp:prompt_tokens_total") or 0.0
    cached = _total(series, "llamacpp:prompt_tokens_cached_total") or 0.0
    sample = LoadSample(
        scraped_at_ms=now_ms,
        ok=True,
        waiting=_total(series, "llamacpp:requests_deferred") or 0.0,
        running=_total(series, "llamacpp:requests_processing") or 0.0,
        prompt_tokens=computed + cached,
        cached_prompt_tokens=cached,
        unreported=LLAMA_CPP_UNREPORTED + (() if slots else LLAMA_CPP_WITHOUT_SLOTS),
    )
    if not slots:
        return sample
    try:
        context = sum(int(slot["n_ctx"]) for slot in slots)
        busy = sum(int(slot.get("n_prompt_tokens", 0)) for slot in slots if slot.get("is_processing"))
    except (KeyError, TypeError, ValueError) as exc:
        raise GarbledMetrics(f"unreadable /slots: {exc!r}") from None
    return replace(sample, kv_cache_usage=min(1.0, busy / context) if context > 0 else 0.0,
                   batch_limit=float(len(slots)), batch_limit_at_ms=now_ms)


def _sglang_capacity(series: Series) -> tuple[int, int]:
    """(page size in tokens, pages) of the KV cache, from either generation of SGLang's metrics:
    `sglang:cache_config_info` labels on older servers, separate gauges on newer ones."""
    cache = _labels(series, "sglang:cache_config_info")
    if cache:
        return _int(cache.get("page_size")), _int(cache.get("num_pages"))
    page_size = int(_highest(series, "sglang:page_size") or 0)
    pages = int(_highest(series, "sglang:num_pages") or 0)
    if page_size > 0 and pages > 0:
        return page_size, pages
    tokens = int(_highest(series, "sglang:max_total_num_tokens") or 0)
    return (page_size or 1, tokens // (page_size or 1)) if tokens > 0 else (0, 0)
