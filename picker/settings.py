"""The picker's settings: typed groups, each number with its reason, validated at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass(frozen=True)
class ServerSettings:
    grpc_address: str = "127.0.0.1:9002"
    metrics_address: str = "127.0.0.1:9102"
    # Names this replica's in-flight counts in Redis; unique per replica.
    replica_id: str = ""
    # Envoy's own buffer limit rejects larger bodies first; this guards direct callers.
    max_request_body_bytes: int = 8 * 1024 * 1024
    # On shutdown the replica reports NOT_SERVING this long before refusing streams:
    # two of Envoy's 500 ms health checks, so Envoy has moved its traffic away.
    drain_ms: int = 1000
    # Then streams still open (a response a gateway streams through the picker) have this
    # long to finish before they are cut; a pod's grace period must cover drain plus this.
    shutdown_grace_ms: int = 5000
    # TLS on the ext_proc port with a self-signed certificate made at start, as upstream
    # pickers serve (gateways connect without verifying it); False: plaintext.
    secure_serving: bool = True
    # A plaintext gRPC health server of its own (liveness, readiness, the ext_proc service),
    # for Kubernetes probes, which cannot speak TLS; None: health only on the ext_proc port.
    health_address: str | None = None
    # The admin API (FastAPI): host:port, or None for none; and its bearer tokens' file.
    admin_address: str | None = None
    admin_tokens_file: str | None = None
    # The pool this replica serves when the gateway names none (`namespace/name`): a picker
    # deployed for one InferencePool, as standard gateways run one.
    default_pool: str | None = None


@dataclass(frozen=True)
class StateSettings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    # "redis": prefix index and in-flight counts shared by every replica (the product).
    # "local": each replica keeps its own in memory, as upstream pickers do; a baseline
    # for measuring what sharing is worth. Config and load come from Redis either way.
    mode: str = "redis"
    # The local snapshot of config and load samples; collectors scrape every 100 ms,
    # so a fresher snapshot would not see newer figures.
    snapshot_refresh_ms: int = 50
    # A request-path Redis call slower than this is abandoned for local scoring:
    # a loopback round trip is ~0.1 ms, so 20 ms means Redis is in trouble.
    redis_timeout_ms: int = 20
    # An admission's answer may come later: it decides where the request goes (it re-weighs the decision on
    # the pool's figures of its instant), and in a burst on a loaded machine Redis answers tens of ms late, so
    # a request whose admission fell back at 20 ms went to a choice made on figures read before the burst.
    # A stalled Redis is left alone after 5 request-path deadlines without an answer (state_guard).
    admission_timeout_ms: int = 100
    # After a request-path Redis call fails, the request path leaves Redis alone this long
    # (the heartbeat keeps probing): a stalled Redis then collects no backlog of calls that
    # all complete at once when it recovers and stall the replica's event loop.
    redis_backoff_ms: int = 250
    # A lookup that fails or misses its deadline reads the other replicas' in-flight figures from the
    # last lookup of the pool that was answered, up to this old, rather than seeing none of them:
    # requests run for seconds, so a second-old count is still close, and a replica falling back in a
    # burst keeps steering clear of the endpoints the others just filled.
    recent_view_ms: int = 1000
    # A load sample older than this is unknown, not trusted (ten missed scrapes).
    max_sample_age_ms: int = 1000
    # A replica's in-flight counts stop counting this long after it stops renewing them.
    inflight_lease_ms: int = 5000
    heartbeat_interval_ms: int = 1000


@dataclass(frozen=True)
class PrefixSettings:
    # Upstream's block of 64 characters: about 16 tokens, one vLLM KV block.
    block_chars: int = 64
    # Upstream matches at most 256 blocks (16k characters); longer prompts share more anyway.
    max_blocks: int = 256
    # Index entries outlive no realistic cache residency.
    ttl_ms: int = 600_000
    # Upstream's per-endpoint LRU capacity when the pod does not publish its cache size.
    default_capacity_blocks: int = 31_250
    # Converting the pod's KV tokens to characters of prompt text.
    chars_per_token: float = 4.0
    # In a pool indexed from engine events: how long a placement stands for the blocks its endpoint
    # will cache, until the engine's own event says so. Events arrive within milliseconds of the
    # engine scheduling the request (the collector's lag is measured per endpoint); 2 s covers a queue
    # wait, as the llm-d router's speculative entries do.
    speculative_ttl_ms: int = 2000
    # Model name -> the path of its tokenizer (its GGUF file, or its Hugging Face directory with
    # tokenizer.json and tokenizer_config.json); "" for every other model. Needed by pools indexed from
    # engine events.
    tokenizers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.speculative_ttl_ms <= 0:
            raise ValueError("speculative_ttl_ms must be positive")

    @property
    def block_tokens(self) -> int:
        """Token ids per block of a token-id prompt: as many tokens as a text block holds (16)."""
        return max(1, int(self.block_chars / self.chars_per_token))


@dataclass(frozen=True)
class SchedulingSettings:
    # Upstream's weights: queue 2, KV cache 2, prefix 3; in-flight counts weigh like the queue.
    queue_weight: float = 2.0
    kv_cache_weight: float = 2.0
    inflight_weight: float = 2.0
    prefix_weight: float = 3.0
    # Uncached prompt in flight weighs like the queue: it is the queue's earliest sign.
    prefill_work_weight: float = 2.0
    # Pulls a prefix nobody holds yet to one home endpoint; worth less than a small backlog
    # (one waiting request scores 2 x 1/5 = 0.4 on the queue), so load still decides.
    prefix_home_weight: float = 0.3
    # An adapter running on a pod scores 1, waiting 0.8, a free slot 0.6: weighted like the queue,
    # a running adapter is worth about 6 requests in flight (0.4 x 2 against 2 x 1/16 each), so a
    # hot adapter's burst spreads to a few pods instead of piling onto one.
    lora_affinity_weight: float = 2.0
    # The adapter's home pod (rendezvous on its name) is worth about 4 requests in flight: enough
    # to keep each adapter on few pods between its requests, not to pile a hot one onto one pod.
    adapter_home_weight: float = 0.5
    # Load differences are scored against these scales, so one request more does not
    # outweigh a cached prefix, while a real backlog does. Upstream calls a pod
    # saturated at 5 waiting requests.
    queue_scale: float = 5.0
    inflight_scale: float = 16.0
    # In blocks of `block_chars` (about 16 tokens): 1,024 blocks are four cold 4,000-token
    # prompts, about 0.4 s of prefill on an H100 at 8B (docs/simulator.md). One cold prompt
    # then weighs 0.5: enough to steer other cold prompts away, not enough to pull a cached
    # follow-up off its prefix (benchmark: 512 cost 1 to 2 points of hit rate on workload (a)).
    prefill_work_scale: float = 1024.0
    # For a prompt no endpoint holds any of, nothing is lost wherever it goes: 256 blocks (one cold
    # 4,000-token prompt still to compute weighs 2) send it where the prefill ahead ends first, over
    # its prefix home and a request or two more in flight (with 1,024 for these too, cold first
    # turns on workload (a) queued behind other cold prompts, setting its p99).
    prefill_work_cold_scale: float = 256.0
    # A server's prefill speed assumed until its collector measured one of the pool's servers busy
    # (LoadSample.prefill_tokens_per_s): slower than a GPU serving a model computes (an 8B model on an
    # H100 takes about 40,000 tokens a second), so the estimate never drains a backlog faster than the
    # server does, yet the older of two equal backlogs already counts for less.
    prefill_tokens_per_s_prior: float = 4000.0
    # No request goes to an endpoint with this many waiting while another has fewer (upstream's
    # saturation queue length). When a whole pool is saturated is the pool's flow control setting.
    queue_guard_waiting: float = 5.0
    # Endpoints whose scrapes failed this often in a row leave the candidates.
    max_scrape_failures: int = 3
    # Endpoints returned to Envoy after the chosen one, in order, for fallback.
    fallbacks: int = 2
    # Scores this close to the best tie (then chosen at random): less than one request
    # in flight more (2 x 1/16 = 0.125), more than a trivially short shared prefix.
    tie_margin: float = 0.1

    @classmethod
    def from_overrides(cls, pairs: list[str]) -> SchedulingSettings:
        """Defaults with `name=value` overrides, each converted to the field's type."""
        types = {f.name: f.type for f in fields(cls)}
        values: dict[str, float | int] = {}
        for pair in pairs:
            name, sep, raw = pair.partition("=")
            if not sep or name not in types:
                raise ValueError(f"--scheduling {pair!r}: expected NAME=VALUE with NAME one of {', '.join(types)}")
            try:
                values[name] = int(raw) if types[name] == "int" else float(raw)
            except ValueError:
                raise ValueError(f"--scheduling {pair!r}: {raw!r} is not a number") from None
        return cls(**values)  # type: ignore[arg-type]  # each value converted to its field's type above


@dataclass(frozen=True)
class FlowSettings:
    # Off: every request goes straight to the pods, saturated or not (Sheddable still refused
    # when no endpoint has room): the baseline flow control is measured against.
    enabled: bool = True
    # A request let through the queue must be admitted within this long, or its grant lapses
    # and its room goes to the next one (its owner died between the grant and the admission).
    grant_ms: int = 2000
    # Grants travel by pub/sub; a replica also checks its waiting tickets this often, in case a
    # message was lost (a reconnect), and retries letting requests through when load changed.
    poll_ms: int = 250
    # Fairness ids are client-chosen: longer ones are cut (they only need to tell tenants apart).
    max_tenant_chars: int = 128
    # Room an endpoint without a fresh load sample offers: its load is unknown, and upstream
    # counts it as not saturated; this many at a time keeps a blind dispatch gradual.
    unknown_endpoint_room: int = 2


@dataclass(frozen=True)
class PickerSettings:
    server: ServerSettings = field(default_factory=ServerSettings)
    state: StateSettings = field(default_factory=StateSettings)
    prefix: PrefixSettings = field(default_factory=PrefixSettings)
    scheduling: SchedulingSettings = field(default_factory=SchedulingSettings)
    flow: FlowSettings = field(default_factory=FlowSettings)

    def __post_init__(self) -> None:
        st, pf, sc = self.state, self.prefix, self.scheduling
        if not self.server.replica_id:
            raise ValueError("server.replica_id must be set")
        if st.mode not in ("redis", "local"):
            raise ValueError("state.mode must be redis or local")
        if min(st.redis_timeout_ms, st.admission_timeout_ms, st.snapshot_refresh_ms, st.heartbeat_interval_ms) <= 0 \
                or min(st.redis_backoff_ms, st.recent_view_ms) < 0:
            raise ValueError("state durations must be positive")
        if st.inflight_lease_ms < 2 * st.heartbeat_interval_ms:
            raise ValueError("state.inflight_lease_ms must cover at least two heartbeats")
        if pf.block_chars < 8 or pf.max_blocks < 1:
            raise ValueError("prefix.block_chars must be >= 8 and prefix.max_blocks >= 1")
        weights = (sc.queue_weight, sc.kv_cache_weight, sc.inflight_weight, sc.prefix_weight, sc.prefill_work_weight,
                   sc.lora_affinity_weight, sc.adapter_home_weight)
        if min(weights) < 0 or sum(weights) == 0:
            raise ValueError("scheduling weights must be non-negative and not all zero")
        scales = (sc.queue_scale, sc.inflight_scale, sc.prefill_work_scale, sc.prefill_work_cold_scale)
        if min(scales) <= 0 or sc.fallbacks < 0:
            raise ValueError("scheduling scales must be positive and fallbacks non-negative")
        if sc.prefill_tokens_per_s_prior < 0:
            raise ValueError("prefill_tokens_per_s_prior must be 0 (unknown) or more")
