"""The project's images (`make images`) start as the pods run them: uid 10001, read-only root,
no capabilities, no network, a /tmp of their own (the pods' emptyDir)."""

from __future__ import annotations

import errno
import re
import shutil
import subprocess

import pytest

from support.jobs import REPO
from support.kube import unavailable

pytestmark = pytest.mark.cluster

TAG = next(line.split('"')[1] for line in (REPO / "pyproject.toml").read_text().splitlines()
           if line.startswith("version = "))  # fmt: skip
LOCKED_DOWN = ["--rm", "--network", "none", "--user", "10001:10001", "--read-only", "--cap-drop", "ALL",
               "--security-opt", "no-new-privileges", "--tmpfs", "/tmp"]  # fmt: skip


def docker_run(image: str, *argv: str, entrypoint: str | None = None) -> subprocess.CompletedProcess[str]:
    override = ["--entrypoint", entrypoint] if entrypoint else []
    return subprocess.run(["docker", "run", *LOCKED_DOWN, *override, image, *argv],
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip


@pytest.fixture(scope="module", params=["operator", "trainer"])
def image(request: pytest.FixtureRequest) -> str:
    name = f"fedtune/{request.param}:{TAG}"
    if shutil.which("docker") is None:
        unavailable("docker is not on PATH (devtools/images/engine.sh installs the engine)")
    if subprocess.run(["docker", "image", "inspect", name], capture_output=True, check=False).returncode != 0:
        unavailable(f"image {name} not built: run `make images`")
    return name


def test_image_runs_locked_down_as_uid_10001(image: str) -> None:
    probe = (
        "import os, pathlib\n"
        "print(os.getuid(), os.getgid())\n"
        "try:\n    pathlib.Path('/probe').write_text('x')\nexcept OSError as error:\n    print(error.errno)\n"
        "pathlib.Path('/tmp/probe').write_text('x'); print('tmp writable')\n"
        "print(open('/proc/self/status').read().split('CapEff:')[1].split()[0])\n"
    )
    result = docker_run(image, "-c", probe, entrypoint="python")
    assert result.returncode == 0, result.stderr
    uid, refused, tmp, caps = result.stdout.split("\n")[:4]
    assert uid == "10001 10001"
    assert refused == str(errno.EROFS), result.stdout  # the root filesystem is read-only
    assert tmp == "tmp writable"
    assert caps == "0000000000000000"


def test_image_entrypoint_answers(image: str) -> None:
    result = docker_run(image, "--help")
    assert result.returncode == 0, result.stderr
    expected = "fedtune-operator" if "operator" in image else "label-trainer"
    assert expected in result.stdout, result.stdout


def test_trainer_image_imports_the_training_stack() -> None:
    name = f"fedtune/trainer:{TAG}"
    if subprocess.run(["docker", "image", "inspect", name], capture_output=True, check=False).returncode != 0:
        unavailable(f"image {name} not built: run `make images`")
    result = docker_run(name, "-c", "import torch, transformers, peft, fedtune.federation.party; "
                        "print(torch.__version__)", entrypoint="python")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def distribution(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # as pip compares names


def pinned() -> dict[str, str]:
    """constraints.txt: distribution -> version (marker lines included)."""
    lines = [line.split(";")[0].strip() for line in (REPO / "constraints.txt").read_text().splitlines()]
    return {distribution(name): version for name, version in (line.split("==") for line in lines
                                                              if line and not line.startswith("#"))}  # fmt: skip


def test_image_holds_exactly_the_pinned_versions(image: str) -> None:
    """Every distribution in the image (torch and its CUDA libraries too) is the one constraints.txt pins."""
    result = docker_run(image, "-m", "pip", "freeze", "--exclude-editable", entrypoint="python")
    assert result.returncode == 0, result.stderr
    installed = dict(line.split("==") for line in result.stdout.splitlines() if "==" in line)
    assert len(installed) > 20, result.stdout
    pins = pinned()
    wrong = {name: (version, pins.get(distribution(name))) for name, version in installed.items()
             if pins.get(distribution(name)) != version}  # fmt: skip
    assert not wrong, f"installed (version, pinned): {wrong}"
