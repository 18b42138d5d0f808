"""The contract between Envoy's configuration (controller) and the picker, and the error shape clients see."""

from __future__ import annotations

from typing import Any

# The picker sets it to the chosen ip:port; Envoy's ORIGINAL_DST cluster connects there.
DESTINATION_HEADER = "x-gateway-destination-endpoint"
# gRPC initial metadata on each ext_proc stream naming the route's InferencePool.
POOL_METADATA_KEY = "x-inference-pool"


def openai_error(status: int, message: str, error_type: str, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error body every gateway answer uses, from the picker or from Envoy."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": status}}
