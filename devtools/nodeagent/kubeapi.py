"""A small JSON client for the Kubernetes API: requests, list+watch, from a kubeconfig.

Only the standard library and PyYAML: the node agent must not depend on the client
generator's model classes (it handles dicts exactly as the API sends them), and a
kubelet-like loop wants full control over watch timeouts and reconnects.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import yaml

Obj = dict[str, Any]


class ApiError(Exception):
    """An error answer of the API server; `status` is the HTTP status."""

    def __init__(self, status: int, body: str) -> None:
        self.status = status
        self.body = body
        try:
            message = json.loads(body).get("message", body)
        except ValueError:
            message = body
        super().__init__(f"{status}: {str(message)[:500]}")


class WatchExpired(Exception):
    """The resourceVersion a watch started from is too old (410 Gone): list again."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    context: ssl.SSLContext | None
    token: str | None


def _data_or_file(entry: Obj, key: str, scratch: Path) -> str | None:
    """A kubeconfig field given inline (`<key>-data`, base64) or as a path (`<key>`)."""
    if entry.get(f"{key}-data"):
        path = scratch / key
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(base64.b64decode(entry[f"{key}-data"]))
        return str(path)
    return entry.get(key)


def endpoint_from_kubeconfig(path: Path) -> Endpoint:
    """The current context's server, TLS material and token."""
    config = yaml.safe_load(path.read_text())
    context_name = config.get("current-context")
    context = next(c["context"] for c in config["contexts"] if c["name"] == context_name)
    cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
    user = next((u["user"] for u in config.get("users", []) if u["name"] == context.get("user")), {})
    url = urlsplit(cluster["server"])
    tls = None
    # ssl wants files; inline data goes to a private folder that lives as long as the process.
    scratch = Path(tempfile.mkdtemp(prefix="nodeagent-kubeconfig-"))
    if url.scheme == "https":
        tls = ssl.create_default_context(cafile=_data_or_file(cluster, "certificate-authority", scratch))
        cert = _data_or_file(user, "client-certificate", scratch)
        key = _data_or_file(user, "client-key", scratch)
        if cert and key:
            tls.load_cert_chain(cert, key)
    port = url.port or (443 if url.scheme == "https" else 80)
    return Endpoint(url.hostname or "127.0.0.1", port, tls, user.get("token"))


class Kube:
    """Thread-safe: each thread keeps its own keep-alive connection."""

    def __init__(self, kubeconfig: Path, timeout_s: float = 30.0) -> None:
        self.endpoint = endpoint_from_kubeconfig(kubeconfig)
        self.timeout_s = timeout_s
        self._local = threading.local()

    def set_timeout(self, seconds: float) -> None:
        """Later requests of this thread wait at most `seconds` (on a fresh connection)."""
        self.timeout_s = seconds
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
        self._local.conn = None

    # --- plumbing ---------------------------------------------------------------------------

    def _connect(self, timeout_s: float) -> http.client.HTTPConnection:
        ep = self.endpoint
        if ep.context is not None:
            return http.client.HTTPSConnection(ep.host, ep.port, context=ep.context, timeout=timeout_s)
        return http.client.HTTPConnection(ep.host, ep.port, timeout=timeout_s)

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "fedtune-nodeagent"}
        if content_type:
            headers["Content-Type"] = content_type
        if self.endpoint.token:
            headers["Authorization"] = f"Bearer {self.endpoint.token}"
        return headers

    def request(
        self,
        method: str,
        path: str,
        body: Obj | None = None,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Obj:
        url = path + (f"?{urlencode(query)}" if query else "")
        payload = json.dumps(body).encode() if body is not None else None
        headers = self._headers(content_type if payload is not None else None)
        for attempt in range(2):
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = self._connect(self.timeout_s)
            try:
                conn.request(method, url, body=payload, headers=headers)
                response = conn.getresponse()
                data = response.read()
                break
            except (http.client.HTTPException, OSError) as err:
                # A keep-alive connection the server closed: one fresh try. A timeout is
                # the server's silence, not a stale connection: no second wait.
                conn.close()
                self._local.conn = None
                if attempt or isinstance(err, TimeoutError):
                    raise
        if response.status >= 400:
            raise ApiError(response.status, data.decode("utf-8", "replace"))
        return json.loads(data) if data else {}

    def get(self, path: str) -> Obj | None:
        try:
            return self.request("GET", path)
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    def delete(self, path: str, body: Obj | None = None) -> None:
        try:
            self.request("DELETE", path, body=body)
        except ApiError as err:
            if err.status != 404:
                raise

    def merge_patch(self, path: str, patch: Obj) -> Obj:
        return self.request("PATCH", path, body=patch, content_type="application/merge-patch+json")

    # --- list + watch ---------------------------------------------------------------------------

    def list(self, path: str) -> tuple[list[Obj], str]:
        result = self.request("GET", path)
        return result.get("items", []), result["metadata"]["resourceVersion"]

    def watch(self, path: str, resource_version: str, timeout_s: int = 60) -> Iterator[Obj]:
        """Events after `resource_version` until the server ends the watch (after `timeout_s`)."""
        query = {
            "watch": "1",
            "resourceVersion": resource_version,
            "timeoutSeconds": str(timeout_s),
            "allowWatchBookmarks": "true",
        }
        conn = self._connect(timeout_s + 15)
        try:
            conn.request("GET", f"{path}?{urlencode(query)}", headers=self._headers(None))
            response = conn.getresponse()
            if response.status == 410:
                raise WatchExpired(path)
            if response.status >= 400:
                raise ApiError(response.status, response.read().decode("utf-8", "replace"))
            while True:
                line = response.readline()
                if not line:
                    return
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    if event.get("object", {}).get("code") == 410:
                        raise WatchExpired(path)
                    raise ApiError(int(event.get("object", {}).get("code") or 500), json.dumps(event["object"]))
                yield event
        finally:
            conn.close()


Handler = Callable[[str, Obj], None]


class Informer:
    """List, then watch, forever: keeps `handler(type, object)` told of every change.

    On start and after a lost watch it lists again and reports every object as ADDED
    (a level-triggered consumer does not mind) and every vanished one as DELETED.
    """

    def __init__(self, kube: Kube, path: str, handler: Handler, stop: threading.Event) -> None:
        self.kube = kube
        self.path = path
        self.handler = handler
        self.stop = stop
        self.synced = threading.Event()
        self._known: dict[str, Obj] = {}
        self.thread = threading.Thread(target=self._run, name=f"informer {path}", daemon=True)

    def start(self) -> Informer:
        self.thread.start()
        return self

    def _relist(self) -> str:
        items, version = self.kube.list(self.path)
        fresh = {item["metadata"]["uid"]: item for item in items}
        for uid, old in self._known.items():
            if uid not in fresh:
                self.handler("DELETED", old)
        for item in items:
            self.handler("ADDED", item)
        self._known = fresh
        self.synced.set()
        return version

    def _run(self) -> None:
        version = ""
        while not self.stop.is_set():
            try:
                if not version:
                    version = self._relist()
                for event in self.kube.watch(self.path, version):
                    obj = event["object"]
                    version = obj["metadata"]["resourceVersion"]
                    if event["type"] == "BOOKMARK":
                        continue
                    if event["type"] == "DELETED":
                        self._known.pop(obj["metadata"]["uid"], None)
                    else:
                        self._known[obj["metadata"]["uid"]] = obj
                    self.handler(event["type"], obj)
                    if self.stop.is_set():
                        return
            except WatchExpired:
                version = ""
            except (TimeoutError, ApiError, OSError, http.client.HTTPException, ValueError):
                # The API server restarting or a dropped connection: list again shortly.
                version = ""
                self.stop.wait(1.0)


def core_path(kind_plural: str, namespace: str | None, name: str = "", sub: str = "") -> str:
    """A core/v1 object's path (`sub`: a subresource such as status, binding or token)."""
    base = f"/api/v1/namespaces/{quote(namespace)}/{kind_plural}" if namespace else f"/api/v1/{kind_plural}"
    path = f"{base}/{quote(name)}" if name else base
    return f"{path}/{sub}" if sub else path


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
