"""Fixtures for tests that need a real Kubernetes control plane.

The control plane (etcd, kube-apiserver, kube-controller-manager) is built by
devtools/cluster/build.sh into ${FEDTUNE_CACHE:-~/.cache/fedtune}/bin. Without
those binaries the cluster tests skip, unless FEDTUNE_REQUIRE_CLUSTER is set
(CI): then a missing control plane is a failure, never a silent skip.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devtools.cluster import devcluster
from support.kube import unavailable

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


def _runner(argv: list[str], timeout: float) -> Callable[..., subprocess.CompletedProcess[str]]:
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


@pytest.fixture(scope="session")
def helm() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the helm that build.sh built (not whatever helm is on PATH)."""
    binary = devcluster.bin_dir() / "helm"
    if not binary.exists():
        unavailable(f"helm not built at {binary}; run devtools/cluster/build.sh")
    return _runner([str(binary)], timeout=180)


@pytest.fixture(scope="session")
def kubectl(control_plane: object) -> Kubectl:
    """Run `kubectl --kubeconfig <control plane> ARGS...`; returns the CompletedProcess."""
    binary = shutil.which("kubectl")
    if binary is None:
        unavailable("kubectl is not on PATH")
    return _runner([binary, "--kubeconfig", str(control_plane.kubeconfig)], timeout=60)  # type: ignore[attr-defined]
