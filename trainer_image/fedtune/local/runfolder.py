"""The run's own folder in the output (`OUT/.fedtune/`): who holds it, what a killed run left, and what
a later `fedtune run --resume` needs.

- `run.lock`, held (flock) by the `fedtune run` using the output: a second one is refused, and a lock
  nobody holds means its launcher is gone, however it ended.
- `run.json`, the processes and private temporary folders a run started, while it runs: after a
  launcher killed with SIGKILL, the next `fedtune run` on the output stops what is still alive of them
  (the kernel's parent-death signal normally has) and removes the folders.
- `resume/` (0700): the job's state in Redis (its append-only file), the run's TLS material and the
  job's terms; kept when a run does not succeed, so that `--resume` carries on from its last round.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
from pathlib import Path
from typing import IO, Any

from fedtune import files
from fedtune.procstat import start_ticks
from fedtune.spec import FederatedFineTune, SpecError

LOCK = "run.lock"
RECORD = "run.json"
RESUME = "resume"
TERMS = "terms.json"
# What may differ between a run and its resumption: where things run and land, not what is trained.
RUNTIME_FIELDS = ("output", "scheduler", "redis", "image", "imagePullPolicy", "storage", "workingDir",
                  "backoffLimit", "scheduling", "runPolicy")
TEMP_PREFIXES = ("fedtune-run-", "fedtune-redis-")  # the only folders `clear_killed` removes


# --- the job's terms ------------------------------------------------------------------------------


def job_terms(job: FederatedFineTune) -> dict[str, Any]:
    """What a resumed run must share with the run it continues: the spec but where things run.

    Until the spec computes the federation's terms itself, this is the dumped spec minus those fields
    (and the parties' addresses); `terms_digest` is the one place to point at that digest then."""
    spec = job.model_dump(mode="json", exclude_none=True)["spec"]
    for name in RUNTIME_FIELDS:
        spec.pop(name, None)
    for party in spec.get("parties", []):
        party.pop("address", None)
    return {"job": job.job_id, "spec": spec}


def terms_digest(terms: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(terms, sort_keys=True).encode()).hexdigest()


def first_difference(old: Any, new: Any, path: str = "") -> str:
    """The first field (dotted, with list indices) where two dumped specs differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            if old.get(key) != new.get(key):
                return first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            if a != b:
                return first_difference(a, b, f"{path}[{i}]")
    return path


def save_terms(resume_dir: Path, job: FederatedFineTune) -> None:
    terms = job_terms(job)
    files.write_json_atomic(resume_dir / TERMS, {"digest": terms_digest(terms), "terms": terms})


def check_resumable(run_dir: Path, job: FederatedFineTune, source: str) -> None:
    """A SpecError unless `run_dir` holds a run of this very job that did not succeed."""
    saved_file = run_dir / RESUME / TERMS
    if not saved_file.is_file():
        where = saved_file.relative_to(run_dir.parent)
        raise SpecError(f"--resume: {run_dir.parent} holds no run to resume (no {where}: it succeeded, never "
                        "started there, or was cleared); run without --resume")
    try:
        saved = json.loads(saved_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise SpecError(f"--resume: {saved_file}: unreadable ({err})") from None
    terms = job_terms(job)
    if saved.get("digest") != terms_digest(terms):
        field = first_difference(saved.get("terms", {}), terms) or "the job"
        raise SpecError(f"--resume: {source}: the job's terms changed since the run in {run_dir.parent} started "
                        f"({field} differs); "
                        "resume it with the job it started with, or start over with --overwrite")


def resumable(run_dir: Path) -> bool:
    return (run_dir / RESUME / TERMS).is_file()


def make_private(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    return folder


# --- who holds the folder, and what a killed holder left ------------------------------------------------


class RunLock:
    """The flock on `run.lock` that the running `fedtune run` holds; released by the kernel when it dies."""

    def __init__(self, handle: IO[str]) -> None:
        self.handle = handle

    @classmethod
    def take(cls, run_dir: Path) -> RunLock:
        """The lock, or a SpecError naming the `fedtune run` that holds it."""
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = (run_dir / LOCK).open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise SpecError(f"{run_dir.parent} is in use by a running `fedtune run` (pid {holder}); wait for it "
                            "or stop it first") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        return cls(handle)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            Path(self.handle.name).unlink()
        self.handle.close()


def record(run_dir: Path, pids: list[int], temp: list[Path]) -> None:
    """Write down what this run started (pid and start time of each process group leader) and its private
    temporary folders, for `clear_killed`."""
    processes = [[pid, start_ticks(pid)] for pid in pids]
    files.write_json_atomic(run_dir / RECORD, {"launcher": os.getpid(), "processes": processes,
                                               "temp": [str(p) for p in temp]})


def forget(run_dir: Path) -> None:
    (run_dir / RECORD).unlink(missing_ok=True)


def clear_killed(run_dir: Path) -> str:
    """Refuse a folder a live `fedtune run` holds; clear what one killed before it could clean up left (its
    lock is free, its record stays): stop its processes that still live, remove its private temporary
    folders. Says what it did."""
    if not run_dir.is_dir():
        return ""
    lock = RunLock.take(run_dir)  # refused while its launcher lives
    record_file = run_dir / RECORD
    try:
        if not record_file.is_file():
            return ""
        left = json.loads(record_file.read_text(encoding="utf-8"))
        stopped = sum(_kill_group(pid, ticks) for pid, ticks in left.get("processes", []))
        removed = sum(_remove_temp(Path(p)) for p in left.get("temp", []))
        forget(run_dir)
    except (OSError, ValueError, TypeError) as err:
        raise SpecError(f"{record_file}: cannot read what an earlier run left ({err}); remove it") from None
    finally:
        lock.release()
    return (f"cleared what an earlier `fedtune run` (pid {left.get('launcher')}, killed) left: {stopped} "
            f"process(es) stopped, {removed} temporary folder(s) removed")


def _kill_group(pid: int, ticks: int | None) -> bool:
    if ticks is None or start_ticks(pid) != ticks:
        return False  # gone, or the pid now names another process
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGCONT)  # a stopped process would not die of SIGTERM; SIGKILL takes it anyway
        os.killpg(pid, signal.SIGKILL)
        return True
    return False


def _remove_temp(path: Path) -> bool:
    if not path.name.startswith(TEMP_PREFIXES) or not path.is_dir():
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True
