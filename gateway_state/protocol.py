"""The contract between Envoy's configuration (controller) and the picker, and the error shape clients see."""

from __future__ import annotations

from typing import Any

# The picker sets it to the chosen ip:port; Envoy's ORIGINAL_DST cluster connects there.
DESTINATION_HEADER = "x-gateway-destination-endpoint"
# gRPC initial metadata on each ext_proc stream naming the route's InferencePool.
POOL_METADATA_KEY = "x-inference-pool"

# The upstream endpoint-picker protocol's metadata: the picker answers the ordered
# endpoint list under LB_METADATA_NAMESPACE/DESTINATION_HEADER; the gateway may narrow
# the candidates under SUBSET_HINT_NAMESPACE/SUBSET_HINT_KEY, and reports the endpoint
# that served the request under LB_METADATA_NAMESPACE/SERVED_ENDPOINT_KEY.
LB_METADATA_NAMESPACE = "envoy.lb"
SUBSET_HINT_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_HINT_KEY = "x-gateway-destination-endpoint-subset"
SERVED_ENDPOINT_KEY = "x-gateway-destination-endpoint-served"


def openai_error(status: int, message: str, error_type: str, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error body every gateway answer uses, from the picker or from Envoy."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": status}}
