"""Records stored in Redis, and their JSON codec.

One name per concept across all layers: an *endpoint* is one model-server pod
(address and port), a *pool* is an InferencePool's set of endpoints with its
routing settings, a *model* is an InferenceModel, a *load sample* is what a
collector scraped from one endpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Strategy(StrEnum):
    DEFAULT = "DEFAULT"  # queue length, KV-cache use and in-flight requests
    PREFIX_CACHE = "PREFIX_CACHE"  # prefix affinity, guarded by load


class Runtime(StrEnum):
    VLLM = "vllm"
    SGLANG = "sglang"


class Criticality(StrEnum):
    CRITICAL = "Critical"
    STANDARD = "Standard"
    SHEDDABLE = "Sheddable"


class FailureMode(StrEnum):
    FAIL_OPEN = "FailOpen"
    FAIL_CLOSE = "FailClose"


@dataclass(frozen=True)
class Endpoint:
    name: str  # the pod's name, as shown in logs and metrics
    address: str
    port: int
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """`ip:port`, the value Envoy's ORIGINAL_DST cluster routes to."""
        return f"{self.address}:{self.port}"


@dataclass(frozen=True)
class PDProfile:
    """SGLang prefill/decode disaggregation, from an InferenceTrafficPolicy."""

    role_label: str
    bootstrap_port: int
    prefill_role: str = "prefill"
    decode_role: str = "decode"


@dataclass(frozen=True)
class Pool:
    name: str
    target_port: int
    strategy: Strategy = Strategy.DEFAULT
    runtime: Runtime = Runtime.VLLM
    failure_mode: FailureMode = FailureMode.FAIL_OPEN
    endpoints: tuple[Endpoint, ...] = ()
    pd: PDProfile | None = None


@dataclass(frozen=True)
class TargetModel:
    name: str
    weight: int


@dataclass(frozen=True)
class Model:
    name: str  # the `model` clients send
    pool: str
    criticality: Criticality = Criticality.STANDARD
    targets: tuple[TargetModel, ...] = ()


@dataclass(frozen=True)
class Config:
    """One generation of the routing configuration, written by the controller."""

    generation: int
    pools: dict[str, Pool]
    models: dict[str, Model]
    # Keys every prefix hash of the deployment (DESIGN.md rule 10); chosen once by the controller.
    prefix_seed: int = 0


@dataclass(frozen=True)
class LoadSample:
    """One endpoint's load, mapped from vLLM's or SGLang's metric names."""

    scraped_at_ms: int
    ok: bool  # False: the last scrape failed or was garbled, so the figures are stale
    waiting: float = 0.0
    running: float = 0.0
    kv_cache_usage: float = 0.0  # 0..1
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    max_adapters: int = 0
    block_size: int = 0  # tokens per KV block (vLLM block_size, SGLang page_size)
    num_blocks: int = 0  # KV blocks on the device (vLLM num_gpu_blocks)
    prompt_tokens: float = 0.0  # the server's prefill-token counter: when it falls, the server restarted
    consecutive_failures: int = 0
    error: str = ""


def _endpoint(d: dict[str, Any]) -> Endpoint:
    return Endpoint(d["name"], d["address"], int(d["port"]), dict(d.get("labels", {})))


def _pool(d: dict[str, Any]) -> Pool:
    pd = d.get("pd")
    return Pool(
        name=d["name"],
        target_port=int(d["target_port"]),
        strategy=Strategy(d["strategy"]),
        runtime=Runtime(d["runtime"]),
        failure_mode=FailureMode(d["failure_mode"]),
        endpoints=tuple(_endpoint(e) for e in d["endpoints"]),
        pd=PDProfile(**pd) if pd else None,
    )


def _model(d: dict[str, Any]) -> Model:
    return Model(
        name=d["name"],
        pool=d["pool"],
        criticality=Criticality(d["criticality"]),
        targets=tuple(TargetModel(t["name"], int(t["weight"])) for t in d["targets"]),
    )


def encode_config(config: Config) -> bytes:
    return json.dumps(asdict(config), separators=(",", ":"), sort_keys=True).encode()


def decode_config(raw: bytes) -> Config:
    d = json.loads(raw)
    return Config(
        generation=int(d["generation"]),
        pools={k: _pool(v) for k, v in d["pools"].items()},
        models={k: _model(v) for k, v in d["models"].items()},
        prefix_seed=int(d.get("prefix_seed", 0)),
    )


def encode_load(sample: LoadSample) -> bytes:
    return json.dumps(asdict(sample), separators=(",", ":")).encode()


def decode_load(raw: bytes) -> LoadSample:
    d = json.loads(raw)
    d["running_adapters"] = tuple(d.get("running_adapters", ()))
    d["waiting_adapters"] = tuple(d.get("waiting_adapters", ()))
    return LoadSample(**d)
