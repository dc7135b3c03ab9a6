"""What the cluster tests share: skip-or-fail, polling, the admin's API view, the operator process."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# Child kinds the operator creates, as the kubernetes client names their list calls.
_API_NAMES = {
    "pods": "pod", "services": "service", "configmaps": "config_map", "secrets": "secret",
    "persistentvolumeclaims": "persistent_volume_claim", "networkpolicies": "network_policy",
}  # fmt: skip
_KIND_OF = {
    "pods": "Pod", "services": "Service", "configmaps": "ConfigMap", "secrets": "Secret",
    "persistentvolumeclaims": "PersistentVolumeClaim", "networkpolicies": "NetworkPolicy",
}  # fmt: skip


Runner = Callable[..., "subprocess.CompletedProcess[str]"]


def runner(argv: list[str], timeout: float) -> Runner:
    """A function running `argv + args`, raising with stderr on failure unless check=False."""

    def run(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*argv, *args], input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{Path(argv[0]).name} {' '.join(args)} failed ({result.returncode}):\n{result.stderr}"
            )
        return result

    return run


def kubectl_for(kubeconfig: Path) -> Runner:
    """`kubectl --kubeconfig KUBECONFIG ARGS...` (the kubectl on PATH)."""
    binary = shutil.which("kubectl")
    if binary is None:
        unavailable("kubectl is not on PATH")
    return runner([str(binary), "--kubeconfig", str(kubeconfig)], timeout=60)


def unavailable(reason: str) -> None:
    """Skip, or fail when the environment says the cluster is required (CI: never a silent skip)."""
    if os.environ.get("FEDTUNE_REQUIRE_CLUSTER"):
        pytest.fail(f"{reason} (FEDTUNE_REQUIRE_CLUSTER is set)", pytrace=False)
    pytest.skip(reason)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0,
             describe: Callable[[], str] | None = None) -> Any:
    """Poll `check` until it returns something truthy (returned); fail naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    detail = f"\n{describe()}" if describe is not None else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r}){detail}")


class Api:
    """The admin's view of the cluster through the kubernetes client, as plain dicts (None: not found)."""

    def __init__(self, kubeconfig: Path) -> None:
        import kubernetes

        self.client = kubernetes.config.new_client_from_config(str(kubeconfig))
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.networking = kubernetes.client.NetworkingV1Api(self.client)
        self.custom = kubernetes.client.CustomObjectsApi(self.client)
        self.ApiException = kubernetes.client.exceptions.ApiException

    def _get(self, call: Callable[[], Any]) -> dict[str, Any] | None:
        try:
            return self.client.sanitize_for_serialization(call())
        except self.ApiException as err:
            if err.status == 404:
                return None
            raise

    def job(self, ns: str, name: str) -> dict[str, Any] | None:
        return self._get(lambda: self.custom.get_namespaced_custom_object(
            "fedtune.io", "v1alpha1", ns, "federatedfinetunes", name))  # fmt: skip

    def status(self, ns: str, name: str) -> dict[str, Any]:
        return (self.job(ns, name) or {}).get("status") or {}

    def pod(self, ns: str, name: str) -> dict[str, Any] | None:
        return self._get(lambda: self.core.read_namespaced_pod(name, ns))

    def pods(self, ns: str) -> list[dict[str, Any]]:
        return self.client.sanitize_for_serialization(self.core.list_namespaced_pod(ns))["items"]

    def node(self, name: str) -> dict[str, Any] | None:
        return self._get(lambda: self.core.read_node(name))

    def children(self, ns: str, job: str) -> dict[tuple[str, str], dict[str, Any]]:
        """Everything the operator made for `job`, by (kind, name)."""
        selector = f"app.kubernetes.io/part-of=fedtune,fedtune.io/job={job}"
        out = {}
        for kind, api_name in _API_NAMES.items():
            api = self.networking if kind == "networkpolicies" else self.core
            listed = getattr(api, f"list_namespaced_{api_name}")(ns, label_selector=selector)
            for item in self.client.sanitize_for_serialization(listed)["items"]:
                out[(item.get("kind", _KIND_OF[kind]), item["metadata"]["name"])] = item
        return out


class OperatorProcess:
    """`python -m fedtune_operator.main` as a subprocess logging to a file (all namespaces unless given)."""

    def __init__(self, kubeconfig: Path, log: Path, *, namespaces: list[str] | None = None,
                 resync_s: float | None = 1.0, metrics_port: int | None = None, args: tuple[str, ...] = ()) -> None:
        self.kubeconfig, self.log = kubeconfig, log
        self.namespaces, self.resync_s, self.metrics_port = namespaces, resync_s, metrics_port
        self.args = args  # more of fedtune-operator's options
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "FEDTUNE_WATCH_TIMEOUT": "20"}
        if self.resync_s is not None:
            env["FEDTUNE_RESYNC_SECONDS"] = f"{self.resync_s:g}"
        scope = [a for ns in self.namespaces for a in ("--namespace", ns)] if self.namespaces else ["--all-namespaces"]
        if self.metrics_port:
            scope += ["--metrics-port", str(self.metrics_port)]
        scope += self.args
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fedtune_operator.main", *scope, "--liveness", ""],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def lines(self) -> list[str]:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace").splitlines()
        return []

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.lines()[-lines:])

    def denials(self) -> list[str]:
        """Calls the chart's RBAC refused (the API server's wording for them)."""
        return [line for line in self.lines() if "forbidden: User" in line]
