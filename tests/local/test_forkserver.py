"""Roles forked from one process that imported the training stack; their memory measured as PSS."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedtune.local.forkserver import ForkServer
from fedtune.procstat import PeakMemory, process_tree, pss_bytes
from fedtune.spec import SpecError, load_job
from support.jobs import write_job

HOLD_50MB = "import time; block = bytearray(50_000_000); block[::4096] = b'x' * len(block[::4096]); time.sleep(60)"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    forks = ForkServer(dict(os.environ), tmp_path_factory.mktemp("forkserver") / "server.log")
    yield forks
    forks.stop()


def test_a_forked_role_runs_the_command_with_its_own_log(server: ForkServer, tmp_path: Path) -> None:
    # The environment matters too (roles find the Redis password there): every job test relies on it.
    log = tmp_path / "ca.log"
    role = server.spawn(["certs", "ca", "--out", str(tmp_path / "ca"), "--name", "forked"], dict(os.environ), log)
    assert role.wait(120) == 0
    assert "keep it secret" in log.read_text() and (tmp_path / "ca" / "ca.crt").is_file()
    failing = server.spawn(["validate", str(tmp_path / "missing.yaml")], dict(os.environ), tmp_path / "bad.log")
    assert failing.wait(120) == 2
    assert "missing.yaml: cannot read job file" in (tmp_path / "bad.log").read_text()


def test_the_server_makes_the_preflight_checks_that_need_the_training_stack(server: ForkServer,
                                                                            tmp_path: Path) -> None:
    job = load_job(write_job(tmp_path / "job", tmp_path / "model", agg_steps=0.25, epochs=1))
    server.check(job, {"assist_trainer": 40, "node-1": 40, "node-2": 40}, "job.yaml")  # 10 steps each: sound
    with pytest.raises(SpecError, match=r"^job\.yaml: party `assist_trainer` \(12 samples, 3 steps\): "
                                        r"spec\.aggregation\.agg_steps is too small"):
        server.check(job, {"assist_trainer": 12, "node-1": 40, "node-2": 40}, "job.yaml")
    role = server.spawn(["certs", "ca", "--out", str(tmp_path / "ca")], dict(os.environ), tmp_path / "ca.log")
    assert role.wait(120) == 0  # and it goes on forking roles


def test_a_forked_role_is_its_own_process_group_and_its_death_is_reported(server: ForkServer, tmp_path: Path) -> None:
    fifo = tmp_path / "job.yaml"
    os.mkfifo(fifo)  # reading it blocks until someone writes: a role that runs until it is killed
    role = server.spawn(["validate", str(fifo)], dict(os.environ), tmp_path / "role.log")
    assert role.pid != server.proc.pid and os.getpgid(role.pid) == role.pid and role.poll() is None
    os.killpg(role.pid, signal.SIGKILL)  # what the launcher does to a role
    assert role.wait(60) == -signal.SIGKILL


def test_peak_memory_counts_each_process_once(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c",
                               "import subprocess, sys, time; "
                               f"subprocess.Popen([sys.executable, '-c', {HOLD_50MB!r}]); time.sleep(60)"])
    try:
        deadline = time.monotonic() + 60
        while len(process_tree(parent.pid)) < 2 or (pss_bytes(process_tree(parent.pid)[-1]) or 0) < 50e6:
            assert time.monotonic() < deadline, "the child never allocated its 50 MB"
            time.sleep(0.1)
        child = process_tree(parent.pid)[-1]
        memory = PeakMemory()
        memory.sample([("parent", parent.pid), ("child", child)])  # the child is in the parent's tree already
        report = memory.report()
        assert report["parent"] >= 50 and "child" not in report
        assert report["job"] == report["parent"]
    finally:
        for pid in reversed(process_tree(parent.pid)):
            os.kill(pid, signal.SIGKILL)
        parent.wait()
