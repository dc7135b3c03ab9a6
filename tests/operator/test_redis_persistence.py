"""The Redis a job gets keeps the job's state across a restart: the operator's own redis.conf, run by a real
redis-server on a folder standing in for the claim, killed (SIGKILL, as a deleted or evicted pod's
container may be) and started again; without persistence the state is gone, as it was before it became
the default."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fedtune.federation.jobstate import JobState
from fedtune_operator.children.pod import REDIS_DATA_DIR
from fedtune_operator.children.secret import redis_config
from support.children import make_job

REDIS = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(REDIS is None, reason="redis-server is not installed")
PASSWORD = "s3cret-pw"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def redis_pod(config: str, claim: Path) -> Iterator[str]:
    """redis-server on `config` as the pod runs it, its data folder `claim`; killed with SIGKILL at the end."""
    port = _free_port()
    conf = claim.parent / "redis.conf"
    local = config.replace(f"dir {REDIS_DATA_DIR}\n", f"dir {claim}\n").replace("port 6379\n", f"port {port}\n")
    conf.write_text(local + "bind 127.0.0.1\n")
    proc = subprocess.Popen([REDIS, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


def _round_after_restart(example, tmp_path: Path) -> int | None:
    job = make_job(example)
    config = redis_config(job, PASSWORD)
    claim = tmp_path / "claim"
    claim.mkdir()
    with redis_pod(config, claim) as address:
        state = JobState.connect(address, PASSWORD, job.name, wait_s=30)
        state.init(rounds=5, parties={"node-1": "label_trainer"})
        state.set_json("progress", {"round": 3})
    with redis_pod(config, claim) as address:
        found = JobState.connect(address, PASSWORD, job.name, wait_s=30).get_json("progress")
        return None if found is None else found["round"]


def test_a_killed_redis_comes_back_with_the_jobs_state(example, tmp_path) -> None:
    assert _round_after_restart(example, tmp_path) == 3


def test_without_persistence_a_restart_loses_it(example, tmp_path) -> None:
    example["spec"]["redis"] = {"persistence": False}
    assert _round_after_restart(example, tmp_path) is None
