"""`fedtune run` stopped by signals, killed outright and resumed: nothing left behind, and a resumed run ends
with the very adapters of an uninterrupted one. Real processes, real redis-server, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedtune.local.launcher import RUN_DIR
from fedtune.spec import STATE_DIR
from support.jobs import adapter_tensors, pid_writing, processes_started_with, wait_until, write_job

pytestmark = pytest.mark.slow
PARTIES = ("assist_trainer", "node-1", "node-2")
CHECKPOINTS = ["checkpoint-0.25", "checkpoint-0.5", "checkpoint-0.75", "checkpoint-1"]


def start_run(job: Path, out: Path, scratch: Path, *extra: str) -> subprocess.Popen:
    scratch.mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "fedtune", "run", str(job), "--output", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(scratch)})


def finish(run: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    stdout, stderr = run.communicate(timeout=timeout)
    return run.returncode, stdout + stderr


def assert_nothing_left(scratch: Path, run: subprocess.Popen) -> None:
    """No process the run started lives on (within 10 s: the kernel's parent-death signals), its private
    temporary folders are gone (the test's scratch folder is its TMPDIR, the outputs lie beside it)."""
    wait_until(lambda: not processes_started_with(scratch, scratch.parent), 10, "every process of the run to end")
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("fedtune-")]
    assert run.poll() is not None


@pytest.fixture(scope="module")
def long_job(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """Four rounds, node-1 (the most data) slowest: a run lasts long enough to be stopped mid-way."""
    return write_job(tmp_path_factory.mktemp("long") / "job", tiny_model, sizes=(40, 400, 40), agg_steps=0.25,
                     epochs=2, name="poems")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, long_job: Path) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    code, output = finish(start_run(long_job, out, out.parent / "tmp"))
    assert code == 0, output
    return out


def test_sigterm_stops_everything_and_resume_ends_as_an_uninterrupted_run(tmp_path: Path, long_job: Path,
                                                                          uninterrupted: Path) -> None:
    out, scratch = tmp_path / "out", tmp_path / "tmp"
    run = start_run(long_job, out, scratch)
    wait_until(lambda: (out / "node-1" / "checkpoint-0.25").is_dir() or run.poll() is not None, 300, "round 1")
    node1 = pid_writing(out / RUN_DIR / "logs" / "node-1.log")
    cmdline = Path(f"/proc/{node1}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    assert cmdline == "fedtune poems label_trainer node-1"  # what ps shows
    assert Path(f"/proc/{run.pid}/comm").read_text().strip() == "fedtune poems r"  # top's 15 bytes
    run.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    code, output = finish(run)
    assert time.monotonic() - stopped < 15, "it took too long to stop"
    assert code == 143, output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["state"] == "interrupted" and 1 <= summary["round"] < 4
    assert (f"job poems interrupted by SIGTERM after round {summary['round']} of 4; every process it started is "
            f"stopped; continue with: fedtune run {long_job} --output {out} --resume") in output
    assert "Traceback" not in output
    assert_nothing_left(scratch, run)
    assert (out / "node-1" / STATE_DIR).is_dir()  # what the resumption starts from

    resumed = start_run(long_job, out, scratch, "--resume")
    code, output = finish(resumed)
    assert code == 0, output
    assert "fedtune: resuming poems" in output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["state"] == "succeeded" and summary["round"] == 4
    for party in PARTIES:
        assert sorted(p.name for p in (out / party).glob("checkpoint-*")) == CHECKPOINTS
        assert not (out / party / STATE_DIR).exists()
        for checkpoint in CHECKPOINTS:
            mine, reference = adapter_tensors(out / party / checkpoint), adapter_tensors(uninterrupted / party /
                                                                                        checkpoint)
            assert mine.keys() == reference.keys()
            assert all(torch.equal(mine[k], reference[k]) for k in mine), f"{party}/{checkpoint} differs"
    assert not (out / RUN_DIR / "resume").exists()  # a finished run keeps nothing to resume
    assert_nothing_left(scratch, resumed)


def test_sighup_exits_129_and_a_second_signal_kills_at_once(tmp_path: Path, long_job: Path) -> None:
    out, scratch = tmp_path / "out", tmp_path / "tmp"
    run = start_run(long_job, out, scratch)
    wait_until(lambda: (out / RUN_DIR / "logs" / "node-1.log").is_file() or run.poll() is not None, 300,
               "node-1 to start")
    run.send_signal(signal.SIGHUP)
    code, output = finish(run)
    assert code == 129, output
    assert "interrupted by SIGHUP" in output and "--resume" in output
    assert_nothing_left(scratch, run)

    # Redis frozen: stopping cleanly would wait on it (the summary reads it); the second signal does not wait.
    again = start_run(long_job, tmp_path / "again", scratch)
    wait_until(lambda: (tmp_path / "again" / RUN_DIR / "logs" / "node-1.log").is_file() or again.poll() is not None,
               300, "node-1 to start")
    redis = next(pid for pid, cmdline in processes_started_with(scratch, tmp_path).items()
                 if "redis-server" in cmdline)
    os.kill(redis, signal.SIGSTOP)
    again.send_signal(signal.SIGINT)
    time.sleep(1)
    second = time.monotonic()
    again.send_signal(signal.SIGINT)
    code, output = finish(again, timeout=60)
    assert code == 130, output
    assert time.monotonic() - second < 5 and "SIGINT again: every process of the run killed at once" in output
    assert_nothing_left(scratch, again)


def test_a_killed_launcher_takes_its_processes_along_and_the_next_run_clears_and_resumes(
        tmp_path: Path, long_job: Path, uninterrupted: Path) -> None:
    out, scratch = tmp_path / "out", tmp_path / "tmp"
    run = start_run(long_job, out, scratch)
    wait_until(lambda: (out / "node-1" / "checkpoint-0.25").is_dir() or run.poll() is not None, 300, "round 1")
    run.kill()
    run.communicate(timeout=60)
    wait_until(lambda: not processes_started_with(scratch, tmp_path), 10, "the run's processes to die with it")
    assert [p.name for p in scratch.iterdir() if p.name.startswith("fedtune-")], "nothing to clear (test is moot)"

    code, output = finish(start_run(long_job, out, scratch))
    assert code == 2 and "continue it with --resume" in output, output
    assert "cleared what an earlier `fedtune run`" in output and "temporary folder(s) removed" in output
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("fedtune-")]

    resumed = start_run(long_job, out, scratch, "--resume")
    code, output = finish(resumed)
    assert code == 0, output
    final = adapter_tensors(out / "node-2" / "checkpoint-1")
    reference = adapter_tensors(uninterrupted / "node-2" / "checkpoint-1")
    assert all(torch.equal(final[k], reference[k]) for k in reference)
    assert_nothing_left(scratch, resumed)
