"""The few Kubernetes API calls the controller makes, through kubernetes_asyncio's ApiClient.

The client brings authentication (kubeconfig, in-cluster ServiceAccount token,
client certificates) and TLS; objects stay plain JSON dicts, the shape the
manifest parsers read from files too.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client import ApiClient, Configuration


class KubeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class Gone(KubeError):
    """410: the resourceVersion is too old to watch from; list again."""


@dataclass(frozen=True)
class Resource:
    group: str  # "" for the core API
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
        if sub:
            base += f"/{sub}"
        return base


PODS = Resource("", "v1", "pods", "Pod")
SERVICES = Resource("", "v1", "services", "Service")
EVENTS = Resource("", "v1", "events", "Event")
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease")
POOLS_V1 = Resource("inference.networking.k8s.io", "v1", "inferencepools", "InferencePool")
POOLS_V1ALPHA2 = Resource("inference.networking.x-k8s.io", "v1alpha2", "inferencepools", "InferencePool")
MODELS = Resource("inference.networking.x-k8s.io", "v1alpha2", "inferencemodels", "InferenceModel")
OBJECTIVES = Resource("inference.networking.x-k8s.io", "v1alpha2", "inferenceobjectives", "InferenceObjective")
REWRITES = Resource("inference.networking.x-k8s.io", "v1alpha2", "inferencemodelrewrites", "InferenceModelRewrite")
# The same kinds as the llm-d router serves them, under its own group.
LLMD_OBJECTIVES = Resource("llm-d.ai", "v1alpha2", "inferenceobjectives", "InferenceObjective")
LLMD_REWRITES = Resource("llm-d.ai", "v1alpha2", "inferencemodelrewrites", "InferenceModelRewrite")
TRAFFIC_POLICIES = Resource("inferenceextension.alibabacloud.com", "v1alpha1", "inferencetrafficpolicies",
                            "InferenceTrafficPolicy")
GATEWAYS = Resource("gateway.networking.k8s.io", "v1", "gateways", "Gateway")
HTTPROUTES = Resource("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute")

# Everything the controller reads; a kind whose CRD is not installed reads as empty.
WATCHED = (POOLS_V1, POOLS_V1ALPHA2, MODELS, OBJECTIVES, REWRITES, LLMD_OBJECTIVES, LLMD_REWRITES, TRAFFIC_POLICIES,
           GATEWAYS, HTTPROUTES, SERVICES, PODS)


class KubeAPI:
    def __init__(self, client: ApiClient) -> None:
        self._client = client

    @classmethod
    async def connect(cls, kubeconfig: str | None) -> KubeAPI:
        """From a kubeconfig file, or the pod's ServiceAccount when none is given."""
        configuration = Configuration()
        if kubeconfig:
            await kube_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        else:
            kube_config.load_incluster_config(client_configuration=configuration)
        return cls(ApiClient(configuration))

    async def close(self) -> None:
        await self._client.close()

    async def _call(self, method: str, path: str, query: dict[str, Any] | None = None, body: Any = None,
                    content_type: str = "application/json", timeout_s: float = 30.0) -> Any:
        response = await self._client.call_api(
            path, method, query_params=list((query or {}).items()), body=body,
            header_params={"Accept": "application/json", "Content-Type": content_type},
            auth_settings=["BearerToken"], _preload_content=False, _request_timeout=timeout_s)
        return response

    async def request(self, method: str, path: str, query: dict[str, Any] | None = None, body: Any = None,
                      content_type: str = "application/json") -> dict[str, Any]:
        response = await self._call(method, path, query, body, content_type)
        try:
            data = await response.read()
        finally:
            response.release()
        if not 200 <= response.status < 300:
            raise _error(response.status, data)
        return json.loads(data) if data else {}

    async def list(self, resource: Resource, namespace: str | None = None) -> tuple[list[dict[str, Any]], str]:
        """(items, the list's resourceVersion); each item gets its apiVersion and kind back."""
        reply = await self.request("GET", resource.path(namespace))
        items = [{"apiVersion": resource.api_version, "kind": resource.kind, **item} for item in reply["items"]]
        return items, reply["metadata"]["resourceVersion"]

    async def watch(self, resource: Resource, resource_version: str, timeout_s: int,
                    namespace: str | None = None) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(event type, object) from a resourceVersion on, bookmarks included; ends after timeout_s."""
        query = {"watch": "true", "resourceVersion": resource_version, "allowWatchBookmarks": "true",
                 "timeoutSeconds": str(timeout_s)}
        response = await self._call("GET", resource.path(namespace), query, timeout_s=timeout_s + 30)
        try:
            if response.status != 200:
                raise _error(response.status, await response.read())
            async for line in response.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event["type"], event["object"]
                if kind == "ERROR":
                    raise _error(int(obj.get("code", 500)), json.dumps(obj).encode())
                yield kind, obj
        finally:
            response.release()


def _error(status: int, data: bytes) -> KubeError:
    try:
        message = json.loads(data).get("message", "")
    except (ValueError, AttributeError):
        message = data[:200].decode("utf-8", "replace")
    return Gone(status, message) if status == 410 else KubeError(status, message)
