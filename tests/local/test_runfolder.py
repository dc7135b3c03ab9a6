"""The run's folder (`fedtune.local.runfolder`) and process control (`fedtune.procctl`), without a job: who holds
an output, what a killed run left and how it is cleared, whether a run may be resumed, titles, parent death."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedtune.cli import main
from fedtune.local import runfolder
from fedtune.procstat import start_ticks
from fedtune.spec import SpecError, load_job
from support.jobs import files_only_model, wait_until, write_job


@pytest.fixture
def job_file(tmp_path: Path) -> Path:
    return write_job(tmp_path / "job", files_only_model(tmp_path / "model"), name="poems")


def fedtune(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_resume_is_refused_without_a_run_or_when_the_terms_changed(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                                    job_file: Path) -> None:
    out = tmp_path / "out"
    code, message = fedtune(capsys, "run", str(job_file), "--output", str(out), "--resume")
    assert code == 2 and f"--resume: {out} holds no run to resume" in message, message
    assert "Traceback" not in message and not out.exists()

    run_dir = out / ".fedtune"
    runfolder.save_terms(runfolder.make_private(run_dir / runfolder.RESUME), load_job(job_file))
    changed = job_file.read_text().replace("learning_rate: 0.01", "learning_rate: 0.02")
    assert changed != job_file.read_text()
    job_file.write_text(changed)
    code, message = fedtune(capsys, "run", str(job_file), "--output", str(out), "--resume")
    assert code == 2, message
    assert "the job's terms changed" in message and "(spec.trainer.learning_rate differs)" in message


def test_where_a_job_runs_is_not_one_of_its_terms(tmp_path: Path, job_file: Path) -> None:
    job = load_job(job_file)
    run_dir = tmp_path / "out" / ".fedtune"
    runfolder.save_terms(runfolder.make_private(run_dir / runfolder.RESUME), job)
    data = job.model_dump(mode="json", exclude_none=True)
    data["spec"].update(backoffLimit=7, output={"path": "elsewhere/[NODE_ID]"})
    data["spec"]["parties"][1]["address"] = "10.0.0.1:55006"
    runfolder.check_resumable(run_dir, type(job).model_validate(data), "job.yaml")  # no error
    data["spec"]["parties"][1]["trainset"] = [{"path": "other.json"}]
    with pytest.raises(SpecError, match=r"spec\.parties\[1\]\.trainset\[0\]\.path differs"):
        runfolder.check_resumable(run_dir, type(job).model_validate(data), "job.yaml")


def test_an_output_in_use_is_refused_naming_the_run(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                     job_file: Path) -> None:
    out = tmp_path / "out"
    lock = runfolder.RunLock.take(out / ".fedtune")
    try:
        with pytest.raises(SpecError, match=rf"is in use by a running `fedtune run` \(pid {os.getpid()}\)"):
            runfolder.RunLock.take(out / ".fedtune")
        code, message = fedtune(capsys, "run", str(job_file), "--output", str(out), "--overwrite")
        assert code == 2 and f"{out} is in use by a running `fedtune run` (pid {os.getpid()})" in message
    finally:
        lock.release()
    runfolder.RunLock.take(out / ".fedtune").release()  # free again


def test_what_a_killed_run_left_is_cleared_and_nothing_else(tmp_path: Path) -> None:
    run_dir = tmp_path / "out" / ".fedtune"
    run_dir.mkdir(parents=True)
    left = subprocess.Popen(["sleep", "300"], start_new_session=True)  # a role that outlived its launcher
    other = subprocess.Popen(["sleep", "300"], start_new_session=True)  # a process that merely got a recorded pid
    private = tmp_path / "fedtune-run-abc"
    private.mkdir()
    (private / "redis.conf").write_text("requirepass secret\n")
    unrelated = tmp_path / "mine"
    unrelated.mkdir()
    try:
        runfolder.record(run_dir, [left.pid], [private, unrelated])
        said = runfolder.clear_killed(run_dir)
        assert "1 process(es) stopped, 1 temporary folder(s) removed" in said
        assert left.wait(10) == -signal.SIGKILL
        assert not private.exists() and unrelated.is_dir()
        assert not (run_dir / runfolder.RECORD).exists()
        stale = {"launcher": 1, "processes": [[other.pid, start_ticks(other.pid) - 1]], "temp": []}
        (run_dir / runfolder.RECORD).write_text(json.dumps(stale))
        assert "0 process(es) stopped" in runfolder.clear_killed(run_dir)
        assert other.poll() is None  # its start time is not the recorded one
    finally:
        for proc in (left, other):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


TIED = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "from fedtune import procctl; procctl.tie_if_asked(); "
                          "procctl.set_title('fedtune poems label_trainer node-1'); import time; time.sleep(300)"])
print(child.pid, flush=True)
time.sleep(300)
"""


def test_a_tied_process_shows_its_title_and_dies_with_its_parent(tmp_path: Path) -> None:
    env = {**os.environ, "FEDTUNE_DIE_WITH_PARENT": "1"}
    parent = subprocess.Popen([sys.executable, "-c", TIED], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        cmdline = Path(f"/proc/{child}/cmdline")
        wait_until(lambda: cmdline.read_bytes().startswith(b"fedtune poems label_trainer node-1\0"), 30, "the title")
        assert Path(f"/proc/{child}/comm").read_text().strip() == "fedtune poems l"
        parent.kill()
        parent.wait()
        wait_until(lambda: not Path(f"/proc/{child}").exists() or b"State:\tZ" in Path(f"/proc/{child}/status")
                   .read_bytes(), 10, "the child to die with its parent")
    finally:
        if parent.poll() is None:
            parent.kill()
