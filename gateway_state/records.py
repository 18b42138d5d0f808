"""Records stored in Redis, and their JSON codec.

One name per concept across all layers: an *endpoint* is one model-server pod
(address and port), a *pool* is an InferencePool's set of endpoints with its
routing settings, a *model* is an InferenceModel, a *load sample* is what a
collector scraped from one endpoint.

A pool is named `namespace/name` everywhere (Redis keys, Envoy clusters, the
picker's pool metadata, metrics): two namespaces may each hold a pool of the
same name. Its models are looked up within the pool.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any


class Strategy(StrEnum):
    DEFAULT = "DEFAULT"  # queue length, KV-cache use and in-flight requests
    PREFIX_CACHE = "PREFIX_CACHE"  # prefix affinity, guarded by load


class Runtime(StrEnum):
    """The model server a pool's pods run: what their metrics and caches look like."""

    VLLM = "vllm"
    SGLANG = "sglang"
    LLAMA_CPP = "llama.cpp"  # llama.cpp's server: a prompt cache per slot, no KV-block metrics


class Criticality(StrEnum):
    CRITICAL = "Critical"
    STANDARD = "Standard"
    SHEDDABLE = "Sheddable"


# InferenceModel criticality as an InferenceObjective priority: higher is served first, and a
# negative priority is refused at once while its pool is saturated (what Sheddable always meant).
CRITICALITY_PRIORITY = {Criticality.CRITICAL: 1, Criticality.STANDARD: 0, Criticality.SHEDDABLE: -1}


class FailureMode(StrEnum):
    FAIL_OPEN = "FailOpen"
    FAIL_CLOSE = "FailClose"


def pool_id(namespace: str, name: str) -> str:
    """The pool's identity across the fleet; Kubernetes names cannot contain '/'."""
    return f"{namespace}/{name}"


@dataclass(frozen=True)
class Endpoint:
    name: str  # the pod's name, as shown in logs and metrics
    address: str
    port: int
    labels: dict[str, str] = field(default_factory=dict)

    @cached_property
    def key(self) -> str:
        """`ip:port`, the value Envoy's ORIGINAL_DST cluster routes to (asked dozens of times a decision)."""
        return f"{self.address}:{self.port}"


@dataclass(frozen=True)
class PDProfile:
    """SGLang prefill/decode disaggregation, from an InferenceTrafficPolicy."""

    role_label: str
    bootstrap_port: int
    prefill_role: str = "prefill"
    decode_role: str = "decode"


@dataclass(frozen=True)
class FlowControl:
    """A pool's flow control: when it is saturated, and how long a request may wait for room."""

    # An endpoint has room while its waiting queue (as scraped, or as estimated from the requests
    # in flight there since) is below this and its KV cache below that (upstream's thresholds).
    saturation_waiting: float = 5.0
    saturation_kv_cache: float = 0.8
    # Waiting requests are let through to a full endpoint while its queue (counted the same way) stays
    # at most this: the rest wait in the gateway, in priority order, rather than in the pod's
    # first-come queue (benchmarks.overload measures the choice; see docs/operations.md).
    release_waiting: float = 0.0
    # How long a request waits in the gateway for room before it is answered 503.
    queue_ttl_ms: int = 30_000
    # Requests waiting at once, over the fleet; more are refused 429.
    max_queued: int = 10_000
    # Room kept for requests of positive priority (Critical): lower ones are let through only while
    # more than this many requests' room is free in the pool, so a Critical request finds a batch slot
    # at once instead of waiting for one to free (benchmarks.overload measures the choice).
    priority_reserve: int = 0


@dataclass(frozen=True)
class KvEvents:
    """Where a pool's pods publish their KV-cache events (vLLM's and SGLang's `--kv-events-config`), each
    on its own address: the pool's prefix index is then what the engines report (prefix-index: events)."""

    port: int = 5557
    replay_port: int = 5558  # 0: the engines keep no replay buffer


@dataclass(frozen=True)
class Pool:
    name: str  # pool_id(namespace, name)
    target_ports: tuple[int, ...]  # each ready pod is one endpoint per port
    strategy: Strategy = Strategy.DEFAULT
    runtime: Runtime = Runtime.VLLM
    failure_mode: FailureMode = FailureMode.FAIL_OPEN
    endpoints: tuple[Endpoint, ...] = ()
    pd: PDProfile | None = None
    # True once an InferenceModel names the pool: then only its models (and rewrites)
    # are served and others get 404. Otherwise any model is served as it is named.
    lists_models: bool = False
    app_protocol: str = "http"  # or "kubernetes.io/h2c"
    flow: FlowControl = field(default_factory=FlowControl)
    kv_events: KvEvents | None = None  # None: the prefix index records the pickers' placements (approximate)

    def side(self, side: str) -> tuple[Endpoint, ...]:
        """An SGLang PD pool's `prefill` or `decode` endpoints (by the pod label its profile names);
        every endpoint of any other pool."""
        if self.pd is None:
            return self.endpoints
        role = self.pd.prefill_role if side == "prefill" else self.pd.decode_role
        return tuple(e for e in self.endpoints if e.labels.get(self.pd.role_label) == role)


@dataclass(frozen=True)
class TargetModel:
    name: str
    weight: int


# The model entry of an InferenceModelRewrite rule that matches every model.
ANY_MODEL = ""


@dataclass(frozen=True)
class Model:
    name: str  # the `model` clients send (ANY_MODEL: a rewrite for every other name)
    pool: str
    criticality: Criticality = Criticality.STANDARD
    targets: tuple[TargetModel, ...] = ()
    queue_ttl_ms: int = 0  # how long its requests may wait for room; 0: the pool's

    @property
    def priority(self) -> int:
        return CRITICALITY_PRIORITY[self.criticality]


@dataclass(frozen=True)
class Objective:
    """An InferenceObjective: the priority of requests that name it (higher is served first)."""

    name: str
    pool: str
    priority: int = 0


@dataclass(frozen=True)
class Config:
    """One generation of the routing configuration, written by the controller."""

    generation: int
    pools: dict[str, Pool]
    models: dict[str, dict[str, Model]]  # pool -> model name -> model
    # Keys every prefix hash of the deployment (Redis holds hashes, never prompt text); chosen once by the controller.
    prefix_seed: int = 0
    objectives: dict[str, dict[str, Objective]] = field(default_factory=dict)  # pool -> name -> objective

    def model(self, pool: Pool, name: str) -> Model | None:
        """What a request for `name` on `pool` runs as; None: the pool does not serve it."""
        listed = self.models.get(pool.name, {})
        found = listed.get(name) or listed.get(ANY_MODEL)
        if found is not None:
            return found
        return None if pool.lists_models else Model(name, pool.name, targets=(TargetModel(name, 1),))


@dataclass(frozen=True)
class LoadSample:
    """One endpoint's load, mapped from vLLM's, SGLang's or llama.cpp's metric names."""

    scraped_at_ms: int
    ok: bool  # False: the last scrape failed or was garbled, so the figures are stale
    waiting: float = 0.0
    running: float = 0.0
    kv_cache_usage: float = 0.0  # 0..1
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    max_adapters: int = 0  # LoRA slots (vLLM's max_lora); 0: the server serves no adapters
    base_model: str = ""  # the model the server runs (its metrics' model_name); other names are adapters
    block_size: int = 0  # tokens per KV block (vLLM block_size, SGLang page_size)
    num_blocks: int = 0  # KV blocks on the device (vLLM num_gpu_blocks)
    prompt_tokens: float = 0.0  # the server's prefill-token counter: when it falls, the server restarted
    cached_prompt_tokens: float = 0.0  # the server's counter of prompt tokens served from its prefix cache
    # The fastest the server was seen computing uncached prompt tokens (tokens per second, over a few
    # seconds); 0 unknown. Kept by the collector since the server started (collector.with_prefill_rate).
    prefill_tokens_per_s: float = 0.0
    prefill_rate_at_ms: int = 0  # when the collector began measuring this server (its first sample)
    # The batch the server was last seen full at: its running count when requests were waiting there
    # and no LoRA adapter was waiting for a slot; 0 unknown. The collector keeps it a few seconds,
    # unless the server runs more without queueing. No metric of vLLM or SGLang says how many
    # sequences fit, and it varies with their lengths.
    batch_limit: float = 0.0
    batch_limit_at_ms: int = 0  # when it was seen
    # The fleet's requests in flight at the endpoint (every picker replica's) when it was scraped; -1
    # unknown. What it ran and queued beyond them came from elsewhere: other clients, synthetic load.
    gateway_inflight: int = -1
    # Figures the server does not report (field names; "adapters" for the LoRA ones): their zeros mean
    # unknown, and the scorers that read them do without (llama.cpp has no KV blocks, for one).
    unreported: tuple[str, ...] = ()
    consecutive_failures: int = 0
    error: str = ""

    def restarted_since(self, before: LoadSample) -> bool:
        """The server is a new process since `before`: its prefill-token counter fell, so the KV cache
        the prefix index describes is gone."""
        return self.ok and self.prompt_tokens < before.prompt_tokens


@dataclass(frozen=True)
class KvStreamStatus:
    """One endpoint's KV-event stream as the collector that owns the endpoint sees it."""

    collector: str
    state: str  # "live", "silent" (it serves, its stream says nothing), "connecting", "down"
    updated_ms: int  # Redis's clock
    seq: int = -1  # the last batch applied; -1 none yet
    blocks: int = 0  # blocks of the endpoint in the index
    block_size: int = 0  # tokens per engine block, from its events; 0 unknown yet
    last_event_ms: int = 0  # when the last batch was applied (Redis's clock)
    lag_ms: float = 0.0  # from the engine's timestamp of the last batch to its being applied
    batches: int = 0
    gaps: int = 0  # sequence numbers missed and asked again from the replay buffer
    resyncs: int = 0  # times the endpoint's entries were dropped and rebuilt (a restart, a gap not replayable)
    garbage: int = 0  # messages that did not decode, skipped
    orphans: int = 0  # blocks whose parent the index did not know (stored before the stream was followed)

    @property
    def live(self) -> bool:
        return self.state == "live"


@dataclass(frozen=True)
class BypassSample:
    """What one gateway instance did with a pool's requests over a trailing window, from its own ext_proc
    counters: how many went to the pool's picker filter, and how many of those it served without a
    picker's decision (the filter's failure mode let them through: round robin, or a FailClose 503)."""

    at_ms: int  # when read (Redis's clock)
    window_ms: int  # what the figures span: the collector's window, less while it is young
    requests: int
    bypassed: int
    requests_total: int = 0  # the gateway's counters as read, since it started
    bypassed_total: int = 0

    @property
    def ratio(self) -> float:
        return self.bypassed / self.requests if self.requests else 0.0


def _endpoint(d: dict[str, Any]) -> Endpoint:
    return Endpoint(d["name"], d["address"], int(d["port"]), dict(d.get("labels", {})))


def _pool(d: dict[str, Any]) -> Pool:
    pd = d.get("pd")
    return Pool(
        name=d["name"],
        target_ports=tuple(int(p) for p in d["target_ports"]),
        strategy=Strategy(d["strategy"]),
        runtime=Runtime(d["runtime"]),
        failure_mode=FailureMode(d["failure_mode"]),
        endpoints=tuple(_endpoint(e) for e in d["endpoints"]),
        pd=PDProfile(**pd) if pd else None,
        lists_models=bool(d.get("lists_models", False)),
        app_protocol=d.get("app_protocol", "http"),
        flow=FlowControl(**d["flow"]) if "flow" in d else FlowControl(),
        kv_events=KvEvents(**d["kv_events"]) if d.get("kv_events") else None,
    )


def _model(d: dict[str, Any]) -> Model:
    return Model(
        name=d["name"],
        pool=d["pool"],
        criticality=Criticality(d["criticality"]),
        targets=tuple(TargetModel(t["name"], int(t["weight"])) for t in d["targets"]),
        queue_ttl_ms=int(d.get("queue_ttl_ms", 0)),
    )


def encode_config(config: Config) -> bytes:
    return json.dumps(asdict(config), separators=(",", ":"), sort_keys=True).encode()


def decode_config(raw: bytes) -> Config:
    d = json.loads(raw)
    return Config(
        generation=int(d["generation"]),
        pools={k: _pool(v) for k, v in d["pools"].items()},
        models={pool: {k: _model(v) for k, v in models.items()} for pool, models in d["models"].items()},
        prefix_seed=int(d.get("prefix_seed", 0)),
        objectives={pool: {k: Objective(v["name"], v["pool"], int(v["priority"])) for k, v in objectives.items()}
                    for pool, objectives in d.get("objectives", {}).items()},
    )


def encode_load(sample: LoadSample) -> bytes:
    return json.dumps(asdict(sample), separators=(",", ":")).encode()


_LOAD_FIELDS = frozenset(LoadSample.__dataclass_fields__)


def decode_load(raw: bytes) -> LoadSample:
    d = json.loads(raw)
    if not d.keys() <= _LOAD_FIELDS:  # from a newer collector, during a rolling upgrade: what this one knows
        d = {k: v for k, v in d.items() if k in _LOAD_FIELDS}
    d["running_adapters"] = tuple(d.get("running_adapters", ()))
    d["waiting_adapters"] = tuple(d.get("waiting_adapters", ()))
    d["unreported"] = tuple(d.get("unreported", ()))
    return LoadSample(**d)


def encode_bypass(sample: BypassSample) -> bytes:
    return json.dumps(asdict(sample), separators=(",", ":")).encode()


def decode_bypass(raw: bytes) -> BypassSample:
    return BypassSample(**json.loads(raw))


def encode_kv_status(status: KvStreamStatus) -> bytes:
    return json.dumps(asdict(status), separators=(",", ":")).encode()


def decode_kv_status(raw: bytes | str) -> KvStreamStatus:
    d = json.loads(raw)
    return KvStreamStatus(**{k: v for k, v in d.items() if k in _KV_STATUS_FIELDS})


_KV_STATUS_FIELDS = frozenset(KvStreamStatus.__dataclass_fields__)
