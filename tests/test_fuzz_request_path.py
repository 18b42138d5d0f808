"""Fuzzing the request path: no body, however malformed, makes the parser or the scheduler raise
anything but a GatewayError (an OpenAI-shaped error at the edge).

The fuzzer is atheris (libFuzzer, coverage-guided; tests/fuzz_request_path.py),
run for 100,000 inputs from a seed corpus of well-formed requests of every
shape plus the inputs that once crashed the picker (tests/fixtures/fuzz/).
Those are also replayed here one by one, so a regression names its input.
"""

from __future__ import annotations

import asyncio
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway_state.records import Config, Endpoint, LoadSample, Model, Pool, Strategy, TargetModel
from picker.errors import GatewayError
from picker.intake import Intake
from picker.plugins.framework import Candidate
from picker.prefix import block_hashes
from picker.request import Prompt
from picker.scheduler import Scheduler, build_profiles
from picker.settings import PrefixSettings, SchedulingSettings, ServerSettings
from picker.state import MemoryState

RUNS = 100_000
CORPUS = Path(__file__).parent / "fixtures" / "fuzz"
PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/other",
         "/v1/completions?stream=1")
ENDPOINTS = tuple(Endpoint(f"pod-{i}", f"10.0.0.{i}", 8000) for i in range(3))
CONFIG = Config(1, {
    "prefix": Pool("prefix", (8000,), Strategy.PREFIX_CACHE, endpoints=ENDPOINTS, lists_models=True),
    "default": Pool("default", (8000,), Strategy.DEFAULT, endpoints=ENDPOINTS, lists_models=True),
}, {
    "prefix": {"m": Model("m", "prefix", targets=(TargetModel("m-a", 1), TargetModel("m-b", 1)))},
    "default": {"d": Model("d", "default", targets=(TargetModel("d", 1),))},
}, prefix_seed=9)


class RequestPath:
    """Body to decision, as the picker takes it, minus the awaits on shared state."""

    def __init__(self) -> None:
        self.intake = Intake(PrefixSettings(), ServerSettings().max_request_body_bytes, random.Random(0))
        self.scheduler = Scheduler(build_profiles(SchedulingSettings(), random.Random(0)))
        self.load = LoadSample(int(time.time() * 1000), True, waiting=1, kv_cache_usage=0.3)
        self.index = MemoryState()  # holds a few prefixes, so matching runs too
        for text in ("<user>hello", "<user>" + "hello " * 40):
            for model in ("m-a", "m-b"):
                hashes = block_hashes(Prompt(text=text), model, CONFIG.prefix_seed, 64, 16, 256)
                asyncio.run(self.index.index("prefix", ENDPOINTS[len(text) % 3].key, hashes, 60_000, 1_000))

    def route(self, data: bytes) -> None:
        """An input: its first byte picks the path, the rest is the body."""
        path, raw = (PATHS[data[0] % len(PATHS)], data[1:]) if data else (PATHS[0], b"")
        try:
            request = self.intake.read(CONFIG, None, path, raw)
            matched = self.index.matched(request.pool.name, request.block_hashes)
            candidates = [Candidate(e, self.load, 0, 0, matched.get(e.key, 0)) for e in request.pool.endpoints]
            decision = self.scheduler.schedule(request.pool.strategy, request.scheduling, candidates)
        except GatewayError:
            return
        assert decision.endpoints and request.target_model in ("m-a", "m-b", "d")


@pytest.mark.parametrize("case", sorted(CORPUS.glob("*.case")), ids=lambda p: p.stem)
def test_kept_inputs_route_or_get_a_gateway_error(case: Path) -> None:
    RequestPath().route(case.read_bytes())


@pytest.mark.slow
def test_a_hundred_thousand_fuzzed_inputs_raise_nothing_else(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(CORPUS, corpus)
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "tests.fuzz_request_path", f"-runs={RUNS}", "-max_total_time=240",
                          "-max_len=4096", "-seed=1", f"-artifact_prefix={tmp_path}/", str(corpus)],
                         capture_output=True, text=True, timeout=270, cwd=Path(__file__).parent.parent)
    done = re.search(r"Done (\d+) runs in (\d+) second", run.stderr)
    print(f"\nfuzz: {done.group(1) if done else '?'} inputs in {time.monotonic() - started:.0f} s, "
          f"corpus {len(list(corpus.iterdir()))} files")
    assert run.returncode == 0, run.stderr[-4000:]
    assert done is not None and int(done.group(1)) >= RUNS, run.stderr[-2000:]
