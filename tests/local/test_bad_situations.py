"""A user's mistakes and the machine's state, each through the whole command as a user runs it: a one-line
error naming the thing, the documented exit code, no traceback, and nothing left behind — no process, no
private temporary folder (each case has a TMPDIR of its own), no key in Redis.

How the machine's state is made, honestly and without privileges: an unwritable output is a folder the
kernel refuses to create files in (/sys: the tests run as root, for whom permissions do not stop a write);
a full disk is the party's file-size limit (RLIMIT_FSIZE, set on the running party with prlimit: its
writes then fail with EFBIG where a full disk fails with ENOSPC, through the same path); Redis gone is
redis-server killed; a dataset removed mid-run is deleted, then its party killed, so that its restart
reads it again."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedtune.federation.jobstate import redis_client
from fedtune.local import runfolder
from fedtune.spec import load_job
from support.jobs import files_only_model, pid_writing, processes_started_with, wait_until, write_job

UNWRITABLE = Path("/sys/fedtune-output")


@dataclass
class Case:
    """`fedtune ARGS` in a prepared folder: the exit code and the line it must print."""

    name: str
    prepare: Callable[[Path, Path], list[str]]  # (folder, a job in it) -> the arguments after `fedtune`
    code: int
    message: str  # a regular expression searched in stderr


def job_in(folder: Path, model: Path, **overrides: object) -> Path:
    return write_job(folder / "job", model, name="poems", **overrides)  # type: ignore[arg-type]


def edited(job: Path, old: str, new: str) -> Path:
    text = job.read_text()
    assert old in text, old
    job.write_text(text.replace(old, new))
    return job


def with_results(folder: Path, job: Path) -> list[str]:
    (folder / "out" / "node-1" / "checkpoint-1").mkdir(parents=True)
    return ["run", str(job), "--output", str(folder / "out")]


def with_other_terms(folder: Path, job: Path) -> list[str]:
    runfolder.save_terms(runfolder.make_private(folder / "out" / ".fedtune" / runfolder.RESUME), load_job(job))
    edited(job, "learning_rate: 0.01", "learning_rate: 0.05")
    return ["run", str(job), "--output", str(folder / "out"), "--resume"]


def run(folder: Path, job: Path, *extra: str) -> list[str]:
    return ["run", str(job), "--output", str(folder / "out"), *extra]


CASES = [
    Case("job file missing", lambda f, j: ["run", str(f / "missing.yaml")], 2, r"missing\.yaml: cannot read job file"),
    Case("job file not YAML", lambda f, j: (j.write_text("spec: [\n"), ["run", str(j)])[1], 2, r"not valid YAML"),
    Case("unknown spec field", lambda f, j: run(f, edited(j, "spec:\n", "spec:\n  bogus: 1\n")), 2, r"bogus"),
    Case("dataset missing", lambda f, j: ((f / "job" / "share-1.json").unlink(), run(f, j))[1], 2,
         r"spec\.parties\[1\]\.trainset\[0\]\.path: .*share-1\.json: no such file"),
    Case("dataset malformed", lambda f, j: ((f / "job" / "share-2.json").write_text('{"instances": ['),
                                            run(f, j))[1], 2, r"share-2\.json: malformed JSON"),
    Case("model folder missing", lambda f, j: run(f, edited(j, "path: " + str(f / "model"), "path: /nowhere/model")),
         2, r"pretrained_model\.path: model folder /nowhere/model does not exist"),
    Case("model without weights", lambda f, j: ((f / "model" / "model.safetensors").unlink(), run(f, j))[1], 2,
         r"holds no model weights"),
    Case("output is a file", lambda f, j: ((f / "out").write_text("x"), run(f, j))[1], 2, r"out is not a folder"),
    Case("output unwritable", lambda f, j: ["run", str(j), "--output", str(UNWRITABLE)], 2,
         r"output /sys/fedtune-output: cannot write in /sys: Permission denied"),
    Case("output holds results", with_results, 2, r"holds an earlier run's results.*--overwrite"),
    Case("resume without a run", lambda f, j: run(f, j, "--resume"), 2, r"holds no run to resume"),
    Case("resume, terms changed", with_other_terms, 2,
         r"the job's terms changed .* \(spec\.trainer\.learning_rate differs\)"),
    Case("resume and overwrite", lambda f, j: run(f, j, "--resume", "--overwrite"), 2,
         r"--overwrite: not allowed with argument --resume"),
    Case("timeout of 0", lambda f, j: run(f, j, "--timeout", "0"), 2, r"--timeout: must be more than 0 seconds"),
    Case("no ranks", lambda f, j: run(f, j, "--ranks-per-party", "0"), 2,
         r"spec\.parties\[0\]\.ranks: Input should be greater than or equal to 1"),
    Case("unknown trainer key", lambda f, j: run(f, edited(j, "seed: 7", "seed: 7\n    warp_speed: 9")), 2,
         r"spec\.trainer\.warp_speed: not an option of transformers' TrainingArguments"),
    Case("rounds too fine", lambda f, j: run(f, edited(j, "agg_steps: 0.5", "agg_steps: 0.01")), 2,
         r"spec\.aggregation\.agg_steps is too small"),
    Case("validate: job missing", lambda f, j: ["validate", str(f / "none.yaml")], 2, r"none\.yaml: cannot read"),
    Case("validate: unknown peft key",
         lambda f, j: ["validate", str(edited(j, "LORA:\n", "LORA:\n      rank_of: 9\n"))], 2, r"peft.*rank_of"),
    Case("role: not a party", lambda f, j: ["label-trainer", "--job", str(j), "--party", "node-9"], 2, r"node-9"),
    Case("role: wrong command", lambda f, j: ["label-trainer", "--job", str(j), "--party", "assist_trainer"], 2,
         r"run it with `fedtune assist-trainer`"),
    Case("role: TLS folder empty", lambda f, j: ((f / "tls").mkdir(), ["scheduler", "--job", str(edited(
        j, "spec:\n", "spec:\n  redis: {address: '127.0.0.1:1'}\n")), "--tls-dir", str(f / "tls")])[1], 2,
         r"--tls-dir .*tls: missing ca\.crt, tls\.crt, tls\.key"),
    Case("scheduler without Redis address", lambda f, j: ["scheduler", "--job", str(j)], 2,
         r"spec\.redis\.address is not set"),
    Case("report: not an output", lambda f, j: ["report", str(f)], 2, r"summary\.json: not found"),
    Case("chat: no model", lambda f, j: ["chat", "--model", str(f / "none"), "--adapter", str(f / "none"),
                                         "--prompt", "x"], 2, r"none"),
    Case("import-xfl: no config", lambda f, j: ["import-xfl", str(f / "none"), "-o", str(f / "x.yaml")], 2,
         r"no fed_conf\.json"),
    Case("certs: no CA", lambda f, j: ["certs", "issue", "--ca", str(f / "ca"), "--name", "node-1", "--out",
                                       str(f / "n1")], 2, r"--ca .*ca: missing"),
]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return files_only_model(tmp_path / "model")


def fedtune(args: list[str], scratch: Path, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    scratch.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "fedtune", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TMPDIR": str(scratch), **(env or {})})


def assert_said_and_left_nothing(done: subprocess.CompletedProcess, code: int, message: str, folder: Path) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == code, output
    assert re.search(message, done.stderr), f"{message!r} not in: {done.stderr}"
    assert "Traceback" not in output, output
    scratch = folder / "tmp"
    wait_until(lambda: not processes_started_with(scratch, folder), 10, "every process it started to end")
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("fedtune-")], list(scratch.iterdir())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_refused_in_one_line_leaving_nothing(case: Case, tmp_path: Path, model: Path) -> None:
    args = case.prepare(tmp_path, job_in(tmp_path, model))
    assert_said_and_left_nothing(fedtune(args, tmp_path / "tmp"), case.code, case.message, tmp_path)
    assert not UNWRITABLE.exists()


def test_output_in_use_by_a_live_run(tmp_path: Path, model: Path) -> None:
    job = job_in(tmp_path, model)
    lock = runfolder.RunLock.take(tmp_path / "out" / ".fedtune")  # what a running `fedtune run` holds
    try:
        done = fedtune(run(tmp_path, job, "--overwrite"), tmp_path / "tmp")
    finally:
        lock.release()
    assert_said_and_left_nothing(done, 2, rf"is in use by a running `fedtune run` \(pid {os.getpid()}\)", tmp_path)


def redis_job(tmp_path: Path, model: Path, redis_server) -> Path:
    return job_in(tmp_path, model, redis={"address": redis_server.address})


def assert_no_keys(redis_server) -> None:
    client = redis_client(redis_server.address, redis_server.password)
    assert client.keys("fedtune:*") == []


def test_scheduler_port_in_use(tmp_path: Path, model: Path, redis_server) -> None:
    job = redis_job(tmp_path, model, redis_server)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = fedtune(["scheduler", "--job", str(job), "--insecure", "--listen", f"127.0.0.1:{port}"],
                       tmp_path / "tmp", env={"FEDTUNE_REDIS_PASSWORD": redis_server.password})
    assert_said_and_left_nothing(done, 1, rf"cannot listen on 127\.0\.0\.1:{port}: address in use", tmp_path)
    assert_no_keys(redis_server)


def test_scheduler_refused_by_redis(tmp_path: Path, model: Path, redis_server) -> None:
    job = redis_job(tmp_path, model, redis_server)
    done = fedtune(["scheduler", "--job", str(job), "--insecure"], tmp_path / "tmp",
                   env={"FEDTUNE_REDIS_PASSWORD": "wrong"})
    assert_said_and_left_nothing(done, 1, rf"Redis at {re.escape(redis_server.address)} \(spec\.redis\.address\): "
                                          r".*(password|WRONGPASS)", tmp_path)
    assert_no_keys(redis_server)


# --- the machine's state while a job runs ---------------------------------------------------------------


def long_job(tmp_path: Path, tiny_model: Path) -> Path:
    """node-1 holds the most data: the others wait for it at every round."""
    return write_job(tmp_path / "job", tiny_model, sizes=(16, 160, 16), agg_steps=0.25, epochs=1, name="poems")


def during_run(tmp_path: Path, job: Path, when: Callable[[], bool], act: Callable[[], None]) -> \
        subprocess.CompletedProcess:
    """`fedtune run`, with `act()` done once `when()`; its outcome."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "fedtune", "run", str(job), "--output", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(scratch)})
    try:
        wait_until(lambda: when() or proc.poll() is not None, 300, "the moment to act")
        act()
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def node1_log(tmp_path: Path) -> Path:
    return tmp_path / "out" / ".fedtune" / "logs" / "node-1.log"


@pytest.mark.slow
def test_full_disk_while_saving_fails_the_job_naming_the_checkpoint(tmp_path: Path, tiny_model: Path) -> None:
    def limit_node1() -> None:  # 4 KB: its log fits, round 1's adapter (about 12 KB) does not
        resource.prlimit(pid_writing(node1_log(tmp_path)), resource.RLIMIT_FSIZE, (4096, 4096))

    done = during_run(tmp_path, long_job(tmp_path, tiny_model), lambda: node1_log(tmp_path).is_file(), limit_node1)
    assert_said_and_left_nothing(done, 1, r"job failed: node-1: \[Errno 27\] cannot write round 1's adapter to "
                                          r".*node-1/checkpoint-0\.25: File too large", tmp_path)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["state"] == "failed" and "File too large" in summary["error"]
    assert not list((tmp_path / "out" / "node-1").glob("checkpoint-*"))  # nothing half-written
    assert not list((tmp_path / "out" / "node-1").glob(".checkpoint-*"))


@pytest.mark.slow
def test_dataset_removed_mid_run_fails_the_job_naming_the_file(tmp_path: Path, tiny_model: Path) -> None:
    job = long_job(tmp_path, tiny_model)

    def remove_and_restart() -> None:
        (tmp_path / "job" / "share-1.json").unlink()
        os.kill(pid_writing(node1_log(tmp_path)), signal.SIGKILL)  # its restart reads the data again

    done = during_run(tmp_path, job, lambda: (tmp_path / "out" / "node-1" / "checkpoint-0.25").is_dir(),
                      remove_and_restart)
    assert_said_and_left_nothing(done, 1, r"job failed: node-1: .*share-1\.json", tmp_path)


@pytest.mark.slow
def test_redis_gone_mid_run_fails_the_job_saying_so(tmp_path: Path, tiny_model: Path) -> None:
    def kill_redis() -> None:
        redis = next(pid for pid, cmdline in processes_started_with(tmp_path / "tmp", tmp_path).items()
                     if "redis-server" in cmdline)
        os.kill(redis, signal.SIGKILL)

    done = during_run(tmp_path, long_job(tmp_path, tiny_model), lambda: node1_log(tmp_path).is_file(), kill_redis)
    assert_said_and_left_nothing(done, 1, r"Redis, which holds the job's state \(127\.0\.0\.1:\d+\), stopped "
                                          r"answering", tmp_path)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["state"] == "failed"
