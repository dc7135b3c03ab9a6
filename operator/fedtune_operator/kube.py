"""A thin JSON client for the few Kubernetes calls the operator makes.

It reuses the official client's configuration, authentication and connection pool
(`kubernetes.client.ApiClient`) but sends and returns plain dicts: the generated API
classes validate and build model objects for every item, which costs more than the
request itself when a pass lists a job's pods (and the operator only needs dicts).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import kubernetes
from kubernetes import client

from .jobs import API_VERSION, KIND, PLURAL

# Kinds the operator touches: kind -> URL segment.
PLURALS = {
    "Pod": "pods",
    "Service": "services",
    "ConfigMap": "configmaps",
    "Secret": "secrets",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "Event": "events",
    "NetworkPolicy": "networkpolicies",
    "StorageClass": "storageclasses",
    "Lease": "leases",
    KIND: PLURAL,
}
# The API group and version of kinds outside the core group.
GROUP_VERSIONS = {
    "NetworkPolicy": "networking.k8s.io/v1",
    "StorageClass": "storage.k8s.io/v1",
    "Lease": "coordination.k8s.io/v1",
    KIND: API_VERSION,
}


def api_client() -> client.ApiClient:
    """In a pod: the service account; elsewhere: $KUBECONFIG, as kopf itself logs in."""
    config = client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=config)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=config)
    # Handlers run in a thread pool; let each of them hold a connection.
    config.connection_pool_maxsize = 32
    return client.ApiClient(config)


class ApiError(Exception):
    """A Kubernetes API answer with an error status; `body` is the Status object's text."""

    def __init__(self, status: int, reason: str, body: str) -> None:
        super().__init__(f"{status} {reason}: {body[:500]}")
        self.status = status
        self.reason = reason
        self.body = body

    @property
    def message(self) -> str:
        try:
            return str(json.loads(self.body).get("message", self.body))
        except ValueError:
            return self.body


class Kube:
    def __init__(self, api: client.ApiClient, timeout_s: float = 30.0) -> None:
        self.api = api
        self.timeout_s = timeout_s

    def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
        content_type: str = "application/json",
        accept: str = "application/json",
    ) -> dict[str, Any]:
        headers = {"Accept": accept}
        if body is not None:
            headers["Content-Type"] = content_type
        _, url, headers, payload, _ = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=list((query or {}).items()),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(method, url, header_params=headers, body=payload, _request_timeout=self.timeout_s)
        data = response.read()
        if response.status >= 400:
            raise ApiError(response.status, response.reason or "", data.decode("utf-8", "replace"))
        return json.loads(data) if data else {}

    # --- objects ------------------------------------------------------------------------------

    @staticmethod
    def path(kind: str, namespace: str | None, name: str | None = None) -> str:
        """The URL path of a kind's collection or of one object; namespace None: a cluster-scoped kind."""
        prefix = f"/apis/{GROUP_VERSIONS[kind]}" if kind in GROUP_VERSIONS else "/api/v1"
        scope = "" if namespace is None else f"/namespaces/{quote(namespace)}"
        base = f"{prefix}{scope}/{PLURALS[kind]}"
        return base if name is None else f"{base}/{quote(name)}"

    def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", self.path(kind, namespace, name))
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    def list(self, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        return self.request("GET", self.path(kind, namespace), query={"labelSelector": selector}).get("items", [])

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        meta = manifest["metadata"]
        return self.request("POST", self.path(manifest["kind"], meta["namespace"]), body=manifest)

    def replace(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """PUT the whole object; with metadata.resourceVersion set, a 409 when it changed meanwhile."""
        meta = manifest["metadata"]
        return self.request("PUT", self.path(manifest["kind"], meta["namespace"], meta["name"]), body=manifest)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        try:
            self.request("DELETE", self.path(kind, namespace, name))
        except ApiError as err:
            if err.status != 404:
                raise

    def patch_status(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> None:
        """Apply a JSON merge patch (`merge_patch`) to the object's status subresource: keys set to
        None are removed, the others set (gone already: nothing to do)."""
        path = self.path(kind, namespace, name) + "/status"
        try:
            self.request("PATCH", path, body={"status": patch}, content_type="application/merge-patch+json")
        except ApiError as err:
            if err.status != 404:
                raise


# --- JSON merge patches (RFC 7386), as the API server applies them ---------------------------


def stored(value: Any) -> Any:
    """`value` as the API server keeps it once merged in: keys whose value is None are absent
    (a merge patch deletes them), within maps at any depth; a list is kept as it is."""
    if isinstance(value, dict):
        return {k: stored(v) for k, v in value.items() if v is not None}
    return value


def merge_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The merge patch that turns `old` into `new`: keys `new` lacks set to None (removed), maps
    patched key by key, any other changed value (a list included) replaced whole."""
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            inner = merge_patch(before, value)
            if inner:
                patch[key] = inner
        elif key not in old or before != value:
            patch[key] = value
    return patch
