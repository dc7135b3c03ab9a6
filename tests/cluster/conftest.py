"""Fixtures for tests that need a real Kubernetes control plane.

The control plane (etcd, kube-apiserver, kube-controller-manager) is built by
devtools/cluster/build.sh into ${FEDTUNE_CACHE:-~/.cache/fedtune}/bin. Without
those binaries the cluster tests skip, unless FEDTUNE_REQUIRE_CLUSTER is set
(CI): then a missing control plane is a failure, never a silent skip.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator

import pytest

from devtools.cluster import devcluster
from support.kube import kubectl_for, runner, unavailable

Kubectl = Callable[..., "subprocess.CompletedProcess[str]"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cluster: needs the local Kubernetes control plane (devtools/cluster)")


@pytest.fixture(scope="session")
def expected_versions() -> dict[str, str]:
    """The versions build.sh builds: what the binaries must report."""
    return devcluster.expected_versions()


@pytest.fixture(scope="session")
def control_plane() -> Iterator[object]:
    missing = devcluster.missing_binaries()
    if missing:
        unavailable(
            f"control-plane binaries not built ({', '.join(missing)} missing in {devcluster.bin_dir()}); "
            "run devtools/cluster/build.sh (or make dev-cluster)"
        )
    plane = devcluster.ControlPlane()
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def helm() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the helm that build.sh built (not whatever helm is on PATH)."""
    binary = devcluster.bin_dir() / "helm"
    if not binary.exists():
        unavailable(f"helm not built at {binary}; run devtools/cluster/build.sh")
    return runner([str(binary)], timeout=180)


@pytest.fixture(scope="session")
def kubectl(control_plane: object) -> Kubectl:
    """Run `kubectl --kubeconfig <control plane> ARGS...`; returns the CompletedProcess."""
    return kubectl_for(control_plane.kubeconfig)  # type: ignore[attr-defined]
