"""`/metrics` of a simulated pod, with vLLM's or SGLang's names and label styles.

Both servers expose their metrics through prometheus_client, so a registry per
pod with the same metric objects gives the same text, byte for byte in format.
The prefix-cache counters (in tokens) are the ground truth for hit rates.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from simulator.disaggregation import BootstrapServer, KVReceiver
from simulator.engine import Engine, Sequence
from simulator.physics import Physics

# vLLM's buckets for time to first token.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class VLLMMetrics:
    """vLLM V1 (0.9.2-0.10, where both KV-usage names exist)."""

    def __init__(self, model: str, physics: Physics, max_loras: int) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r, labels, values = self.registry, ["model_name", "engine"], [model, "0"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r).labels(*values)

        self.running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.gpu_cache = gauge("vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage.")
        self.kv_cache = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.queries = Counter("vllm:prefix_cache_queries",
                               "Prefix cache queries, in terms of number of queried tokens.",
                               labels, registry=r).labels(*values)
        self.hits = Counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                            labels, registry=r).labels(*values)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                                     labels, registry=r).labels(*values)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.",
                                         labels, registry=r).labels(*values)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              labels, buckets=_TTFT_BUCKETS, registry=r).labels(*values)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             labels, buckets=_E2E_BUCKETS, registry=r).labels(*values)
        # Only with --enable-lora, as vLLM.
        self.lora = Gauge("vllm:lora_requests_info", "Running stats on lora requests.",
                          ["max_lora", "running_lora_adapters", "waiting_lora_adapters"], registry=r) \
            if max_loras else None
        self._max_loras = max_loras
        Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
              ["block_size", "cache_dtype", "enable_prefix_caching", "gpu_memory_utilization",
               "num_cpu_blocks", "num_gpu_blocks", "num_gpu_blocks_override", "swap_space"],
              registry=r).labels(str(physics.block_size), "auto", "True", "0.9", "0",
                                 str(physics.num_blocks), "None", "4").set(1)

    def on_admit(self, seq: Sequence) -> None:
        self.queries.inc(seq.num_prompt)
        self.hits.inc(seq.cached_tokens)
        self.prompt_tokens.inc(seq.num_prompt)

    def on_first_token(self, seq: Sequence, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def on_finish(self, seq: Sequence, e2e_s: float) -> None:
        self.generation_tokens.inc(seq.generated)
        self.e2e.observe(e2e_s)

    def refresh(self, engine: Engine) -> None:
        self.running.set(len(engine.running))
        self.waiting.set(len(engine.waiting))
        self.gpu_cache.set(engine.cache.usage)
        self.kv_cache.set(engine.cache.usage)
        if self.lora is None:
            return
        running = sorted({s.adapter for s in engine.running if s.adapter})
        waiting = sorted({s.adapter for s in engine.waiting if s.adapter})
        # vLLM keeps one series per adapter set, valued by its timestamp; readers take the newest.
        self.lora.labels(str(self._max_loras), ",".join(running), ",".join(waiting)).set(time.time())

    def render(self) -> bytes:
        return generate_latest(self.registry)


class SGLangMetrics:
    """SGLang with --enable-metrics."""

    def __init__(self, model: str, physics: Physics) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r, labels, values = self.registry, ["model_name", "tp_rank"], [model, "0"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r).labels(*values)

        self.running = gauge("sglang:num_running_reqs", "The number of running requests.")
        self.queue = gauge("sglang:num_queue_reqs", "The number of requests in the waiting queue.")
        self.token_usage = gauge("sglang:token_usage", "The token usage.")
        self.used_tokens = gauge("sglang:num_used_tokens", "The number of used tokens.")
        self.hit_rate = gauge("sglang:cache_hit_rate", "The prefix cache hit rate.")
        self.throughput = gauge("sglang:gen_throughput", "The generation throughput (token/s).")
        self.prompt_tokens = Counter("sglang:prompt_tokens", "Number of prefill tokens processed.",
                                     labels, registry=r).labels(*values)
        self.generation_tokens = Counter("sglang:generation_tokens", "Number of generation tokens processed.",
                                         labels, registry=r).labels(*values)
        self.cached_tokens = Counter("sglang:cached_tokens", "Number of cached prompt tokens.",
                                     labels, registry=r).labels(*values)
        self.ttft = Histogram("sglang:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              labels, buckets=_TTFT_BUCKETS, registry=r).labels(*values)
        self.e2e = Histogram("sglang:e2e_request_latency_seconds", "Histogram of End-to-end request latency in seconds",
                             labels, buckets=_E2E_BUCKETS, registry=r).labels(*values)
        # Prefill/decode disaggregation (zero on a pod that runs both phases).
        self.prefill_bootstrap = gauge("sglang:num_prefill_prealloc_queue_reqs",
                                       "The number of requests in the prefill prealloc queue.")
        self.prefill_inflight = gauge("sglang:num_prefill_inflight_queue_reqs",
                                      "The number of requests in the prefill inflight queue.")
        self.decode_prealloc = gauge("sglang:num_decode_prealloc_queue_reqs",
                                     "The number of requests in the decode prealloc queue.")
        self.decode_transfer = gauge("sglang:num_decode_transfer_queue_reqs",
                                     "The number of requests in the decode transfer queue.")
        self.kv_transfer_latency = gauge("sglang:kv_transfer_latency_ms", "The KV transfer latency in ms.")
        self.bootstrap_failed = Counter("sglang:num_bootstrap_failed_reqs", "The number of bootstrap failed requests.",
                                        labels, registry=r).labels(*values)
        self.transfer_failed = Counter("sglang:num_transfer_failed_reqs", "The number of transfer failed requests.",
                                       labels, registry=r).labels(*values)
        self._failures_seen = [0, 0]  # (bootstrap, transfer) failures already counted
        Gauge("sglang:cache_config_info", "Information of the cache config", ["page_size", "num_pages"],
              registry=r).labels(str(physics.block_size), str(physics.num_blocks)).set(1)
        self._block_size = physics.block_size
        self._window: list[tuple[float, int]] = []  # (time, tokens) of recent finishes, for throughput
        self._queried = 0
        self._hit = 0

    def on_admit(self, seq: Sequence) -> None:
        self.prompt_tokens.inc(seq.num_prompt)
        self.cached_tokens.inc(seq.cached_tokens)
        self._queried += seq.num_prompt
        self._hit += seq.cached_tokens

    def on_first_token(self, seq: Sequence, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def on_finish(self, seq: Sequence, e2e_s: float) -> None:
        self.generation_tokens.inc(seq.generated)
        self.e2e.observe(e2e_s)
        now = time.monotonic()
        self._window = [(t, n) for t, n in self._window if now - t < 10.0] + [(now, seq.generated)]

    def refresh(self, engine: Engine) -> None:
        self.running.set(len(engine.running))
        self.queue.set(len(engine.waiting))
        self.token_usage.set(engine.cache.usage)
        self.used_tokens.set(engine.cache.used_blocks * self._block_size)
        self.hit_rate.set(self._hit / self._queried if self._queried else 0.0)
        now = time.monotonic()
        recent = sum(n for t, n in self._window if now - t < 10.0)
        self.throughput.set(recent / 10.0)

    def refresh_disaggregation(self, bootstrap: BootstrapServer | None, receiver: KVReceiver | None) -> None:
        if bootstrap is not None:
            self.prefill_inflight.set(bootstrap.waiting_decodes)
            self.bootstrap_failed.inc(bootstrap.failed - self._failures_seen[0])
            self._failures_seen[0] = bootstrap.failed
        if receiver is not None:
            self.decode_transfer.set(receiver.transferring)
            self.kv_transfer_latency.set(receiver.last_latency_ms)
            self.transfer_failed.inc(receiver.failed - self._failures_seen[1])
            self._failures_seen[1] = receiver.failed

    def render(self) -> bytes:
        return generate_latest(self.registry)
