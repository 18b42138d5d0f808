"""The simulated GPU: its batching limits, cache size and step-time model.

Step time t = c0 + a * prefill_tokens + b * decode_seqs + g * decode_context_tokens,
multiplied by `time_scale` (below 1 runs faster than real time, same ratios).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Physics:
    # Published fits for an 8B model on one H100 (docs/simulator.md): fixed cost
    # per forward pass of about 6 ms.
    step_overhead_s: float = 0.006
    # 17-35 us per uncached prefill token; the middle of that range.
    prefill_token_s: float = 25e-6
    # 6-10 us per running decode sequence.
    decode_seq_s: float = 8e-6
    # Attention over the context grows with it; small next to the others at 8B.
    context_token_s: float = 2e-8
    # vLLM's default KV block of 16 tokens.
    block_size: int = 16
    # About 29k blocks of 16 tokens fit an 8B model's cache on an 80 GB H100.
    num_blocks: int = 29_000
    # vLLM's default max_num_seqs.
    max_num_seqs: int = 256
    # vLLM's chunked-prefill token budget per step for the API server on an H100.
    max_batched_tokens: int = 8192
    # A context window long enough for the seeds' workloads.
    max_model_len: int = 32_768
    # SGLang PD: an 8B model's KV cache is about 128 KiB per token; at 25 GB/s of RDMA that is
    # about 5 us per token, after a fixed cost per transfer.
    kv_transfer_token_s: float = 5e-6
    kv_transfer_overhead_s: float = 0.002
    # LoRA: reading an adapter (tens of MB at rank 16) from disk into the CPU cache, and
    # copying it into a GPU slot; the step that first runs it pays both or the second.
    lora_load_s: float = 0.1
    lora_activate_s: float = 0.005
    # 1.0 is real time; 0.1 runs ten times faster with the same ratios.
    time_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.num_blocks <= 0 or self.max_num_seqs <= 0:
            raise ValueError("block_size, num_blocks and max_num_seqs must be positive")
        if self.max_batched_tokens < self.max_num_seqs:
            raise ValueError("max_batched_tokens must cover one decode token per sequence")
        if self.time_scale <= 0:
            raise ValueError("time_scale must be positive")

    def step_seconds(self, prefill_tokens: int, decode_seqs: int, decode_context: int) -> float:
        return (
            self.step_overhead_s
            + self.prefill_token_s * prefill_tokens
            + self.decode_seq_s * decode_seqs
            + self.context_token_s * decode_context
        )
