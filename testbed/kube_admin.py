"""The cluster admin's side of the testbed's Kubernetes: apply manifests, create Pods and write their status
(there is no kubelet). The tests and the benchmarks' upstream picker use it."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client as kube_client
from kubernetes import config as kube_config
from kubernetes.client.rest import ApiException
from kubernetes.dynamic import DynamicClient

from testbed.kube import KubeAPIServer

CHART_CRDS = Path(__file__).parent.parent / "charts" / "inference-picker-fleet" / "crds"


class Kube:
    """A client of the test API server, acting as the cluster's admin."""

    def __init__(self, server: KubeAPIServer) -> None:
        self.server = server
        self.api_client = kube_config.new_client_from_config(config_file=str(server.kubeconfig))
        self.core = kube_client.CoreV1Api(self.api_client)
        self.dynamic = DynamicClient(self.api_client)

    def install_crds(self, paths: Iterable[Path], timeout_s: float = 30.0) -> None:
        extensions = kube_client.ApiextensionsV1Api(self.api_client)
        names = []
        for path in paths:
            for doc in yaml.safe_load_all(path.read_text()):
                if doc:
                    self.apply(doc)
                    names.append(doc["metadata"]["name"])
        deadline = time.monotonic() + timeout_s
        for name in names:
            while not any(c.type == "Established" and c.status == "True"
                          for c in extensions.read_custom_resource_definition(name).status.conditions or ()):
                assert time.monotonic() < deadline, f"CRD {name} not established"
                time.sleep(0.1)
        self.dynamic = DynamicClient(self.api_client)  # discover the new kinds

    def resource(self, api_version: str, kind: str) -> Any:
        return self.dynamic.resources.get(api_version=api_version, kind=kind)

    def apply(self, doc: dict[str, Any], namespace: str | None = None) -> Any:
        """Server-side apply, as `kubectl apply --server-side` does."""
        resource = self.resource(doc["apiVersion"], doc["kind"])
        if resource.namespaced:
            doc = {**doc, "metadata": {**doc["metadata"], "namespace": namespace or doc["metadata"].get(
                "namespace", "default")}}
        return resource.server_side_apply(body=doc, name=doc["metadata"]["name"],
                                          namespace=doc["metadata"].get("namespace"), field_manager="testbed",
                                          force_conflicts=True)

    def apply_file(self, path: Path, namespace: str, text: str | None = None) -> None:
        for doc in yaml.safe_load_all(text if text is not None else path.read_text()):
            if doc and doc.get("kind") != "Pod":
                self.apply(doc, namespace)

    def namespace(self, name: str) -> None:
        try:
            self.core.create_namespace({"metadata": {"name": name}})
        except ApiException as exc:
            if exc.status != 409:
                raise

    def create_pod(self, namespace: str, name: str, labels: dict[str, str], ip: str, ready: bool = True,
                   finalizers: tuple[str, ...] = ()) -> None:
        """A Pod as the kubelet would report it: Running at `ip`, Ready or not."""
        self.core.create_namespaced_pod(namespace, {
            "metadata": {"name": name, "labels": labels, "finalizers": list(finalizers)},
            "spec": {"containers": [{"name": "server", "image": "model-server:test"}]},
        })
        self.set_pod_status(namespace, name, ip, ready)

    def set_pod_status(self, namespace: str, name: str, ip: str, ready: bool) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.core.patch_namespaced_pod_status(name, namespace, {"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": now}],
        }})

    def pods_from(self, manifest: str, namespace: str, finalizers: tuple[str, ...] = ()) -> list[str]:
        """Create the Pods a fleet manifest declares (name, labels, podIP and readiness)."""
        names = []
        for doc in yaml.safe_load_all(manifest):
            if doc and doc.get("kind") == "Pod":
                status = doc.get("status", {})
                ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                            for c in status.get("conditions", []))
                self.create_pod(namespace, doc["metadata"]["name"], doc["metadata"].get("labels", {}),
                                status["podIP"], ready, finalizers)
                names.append(doc["metadata"]["name"])
        return names

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any]:
        found: dict[str, Any] = self.resource(api_version, kind).get(name=name, namespace=namespace).to_dict()
        return found

    def events(self, namespace: str) -> list[Any]:
        return list(self.core.list_namespaced_event(namespace).items)

    def close(self) -> None:
        self.api_client.close()
