"""What tokenizing a request as its engine does costs a picker, per decision (pools indexed from engine events).

    .venv/bin/python -m benchmarks.tokenization_cost [--requests 2000]

Chat requests like the capacity benchmark's (a shared system prompt of about 1,500 characters, then a
question of its own), and the seeds' round1/round2 conversation bodies, through the picker's own path
(`picker.tokens.EngineTokens`, the bundled model's tokenizer): the first request of a prompt (nothing
cached), and the steady state, where the system prompt's and earlier turns' pieces come from the cache
of pieces between control tokens. Also the block keys of the ids (`gateway_state.block_keys`), the other
per-decision cost an events pool adds. Prints microseconds per request and writes
bench/out/tokenization_cost.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from gateway_state.block_keys import engine_root, token_keys
from picker.tokens import EngineTokens
from tokenization.model_tokenizer import bundled_model

SYSTEM = "You are a support assistant for an online shop. Answer briefly and politely. " * 20
SEEDS = Path(__file__).parent.parent / "tests" / "fixtures"


def timed(work: Any, repeat: int) -> float:
    """Median microseconds of `work()` over `repeat` calls."""
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        samples.append((time.perf_counter() - started) * 1e6)
    return statistics.median(samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000)
    a = p.parse_args()
    bodies = [{"messages": [{"role": "system", "content": SYSTEM},
                            {"role": "user", "content": f"Question {n}: where is my order number {n * 7919}?"}]}
              for n in range(a.requests)]
    seeds = [json.loads((SEEDS / name).read_text()) for name in ("round1.txt", "round2.txt")]
    result: dict[str, Any] = {}
    cold = EngineTokens({"": str(bundled_model())})
    first = time.perf_counter()
    ids = cold.ids("/v1/chat/completions", bodies[0], "m")
    result["first_request_us"] = (time.perf_counter() - first) * 1e6
    assert ids is not None
    result["prompt_tokens"] = len(ids)
    warm = iter(bodies[1:])
    result["chat_steady_us"] = timed(lambda: cold.ids("/v1/chat/completions", next(warm), "m"), a.requests - 1)
    # Every request with a system prompt of its own: none of its pieces was seen before.
    fresh = iter([{"messages": [{"role": "system", "content": f"Shop {n}. " + SYSTEM},
                                {"role": "user", "content": f"Question {n}: where is my order?"}]}
                  for n in range(200)])
    result["chat_uncached_us"] = timed(lambda: cold.ids("/v1/chat/completions", next(fresh), "m"), 200)
    for body, name in zip(seeds, ("round1", "round2"), strict=True):
        result[f"{name}_tokens"] = len(cold.ids("/v1/chat/completions", body, "m") or [])
        result[f"{name}_steady_us"] = timed(lambda body=body: cold.ids("/v1/chat/completions", body, "m"), 500)
    root = engine_root(None, None, 7)
    result["block_keys_us"] = timed(lambda: token_keys(root, ids, 16, 256, 7), 2000)
    out = Path("bench/out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenization_cost.json").write_text(json.dumps(result, indent=2))
    print(f"chat request of {result['prompt_tokens']} tokens (shared system prompt, own question):")
    print(f"  first request of the process: {result['first_request_us']:.0f} us")
    print(f"  steady state (the system prompt's pieces cached): {result['chat_steady_us']:.0f} us")
    print(f"  a system prompt never seen before: {result['chat_uncached_us']:.0f} us")
    print(f"  its {len(ids) // 16} block keys: {result['block_keys_us']:.0f} us")
    for name in ("round1", "round2"):
        print(f"seeds' {name} ({result[f'{name}_tokens']} tokens), steady state: {result[f'{name}_steady_us']:.0f} us")


if __name__ == "__main__":
    main()
