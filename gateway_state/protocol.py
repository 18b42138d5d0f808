"""The contract between Envoy's configuration (controller) and the picker, and the error shape clients see."""

from __future__ import annotations

from typing import Any

# The picker sets it to the chosen ip:port (a gateway's ORIGINAL_DST cluster may connect there;
# ours reads the ordered list from the metadata below).
DESTINATION_HEADER = "x-gateway-destination-endpoint"
# gRPC initial metadata on each ext_proc stream naming the route's InferencePool, and the
# InferencePool its rule mirrors to with the share of requests copied (0..1).
POOL_METADATA_KEY = "x-inference-pool"
MIRROR_POOL_METADATA_KEY = "x-inference-mirror-pool"
MIRROR_FRACTION_METADATA_KEY = "x-inference-mirror-fraction"

# A copy of the request for a second endpoint (a mirror pool's, or an SGLang PD pool's
# prefill): the picker names the endpoint, and for a mirror the cluster, whose
# override-host policy reads the endpoint header. No cluster header: no copy.
MIRROR_CLUSTER_HEADER = "x-gateway-mirror-cluster"
MIRROR_ENDPOINT_HEADER = "x-gateway-mirror-endpoint"
PREFILL_ENDPOINT_HEADER = "x-gateway-prefill-endpoint"
# Every header above that a client could send to choose an endpoint; Envoy strips them first.
ROUTING_HEADERS = (DESTINATION_HEADER, MIRROR_CLUSTER_HEADER, MIRROR_ENDPOINT_HEADER, PREFILL_ENDPOINT_HEADER)

# The upstream endpoint-picker protocol's metadata: the picker answers the ordered
# endpoint list under LB_METADATA_NAMESPACE/DESTINATION_HEADER; the gateway may narrow
# the candidates under SUBSET_HINT_NAMESPACE/SUBSET_HINT_KEY, and reports the endpoint
# that served the request under LB_METADATA_NAMESPACE/SERVED_ENDPOINT_KEY.
LB_METADATA_NAMESPACE = "envoy.lb"
SUBSET_HINT_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_HINT_KEY = "x-gateway-destination-endpoint-subset"
SERVED_ENDPOINT_KEY = "x-gateway-destination-endpoint-served"

# Request headers of the upstream flow control, by their Gateway API Inference Extension names
# and their newer llm-d names: the InferenceObjective a request runs under (its priority), and
# the tenant it is fair between (round robin between tenants of one priority).
OBJECTIVE_HEADERS = ("x-gateway-inference-objective", "x-llm-d-inference-objective")
FAIRNESS_HEADERS = ("x-gateway-inference-fairness-id", "x-llm-d-inference-fairness-id")


# Each pool's routes run an ext_proc filter of their own, whose counters Envoy tags with the pool:
# `envoy_http_ext_proc_failure_mode_allowed{inference_pool="namespace/name"}` on its Prometheus page,
# so requests served without a picker's decision are counted per pool (the collector reads them).
POOL_STATS_TAG = "inference_pool"


def pool_filter(pool: str) -> str:
    """The name of a pool's ext_proc filter in Envoy's HTTP filter chain."""
    return f"envoy.filters.http.ext_proc/{pool}"


def pool_filter_stat_prefix(pool: str) -> str:
    """The stat prefix of a pool's ext_proc filter: Envoy names its counters
    `http.<listener>.ext_proc.<this><counter>`, and the bootstrap's POOL_STATS_TAG takes the pool from it."""
    return f"{POOL_STATS_TAG}.{pool}."


def pool_cluster(pool: str, role: str = "") -> str:
    """Envoy's cluster for a pool (`namespace/name`): the primary one, or a copy's (`mirror`, `prefill`)."""
    return f"pool/{pool}/{role}" if role else f"pool/{pool}"


def openai_error(status: int, message: str, error_type: str, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error body every gateway answer uses, from the picker or from Envoy."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": status}}
