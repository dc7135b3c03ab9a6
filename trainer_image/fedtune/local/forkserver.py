"""`fedtune run`'s roles as forks of one process that has imported the training stack once.

Started as separate interpreters, every role of a local job imports torch, transformers and
peft itself (seconds of CPU each, all at the same moment) and keeps its own copy of what
they build (hundreds of MB per process). Here one server process imports them, freezes its
objects out of the garbage collector's reach (`gc.freeze`: collections would otherwise write
to, and so un-share, every page) and forks a child per role: the children start at once and
share those pages until they write to them.

The server is single-threaded (forking a threaded process is unsafe) and never touches CUDA,
so a child may still initialise it. It reads one JSON request per line on stdin (`argv`,
`env`, `log`), answers `started <id> <pid>` on stdout, and `exited <pid> <code>` when it reaps
a child. `ForkServer` is the launcher's side; `Forked` stands in for a `subprocess.Popen`. Each child
ends when the server does, and the server when the launcher does (`fedtune.procctl`).

Before any role, the launcher asks it for the pre-flight checks that need the training stack
(`{"check": ...}`, `fedtune.local.preflight.check_training`; answered `checked <notes>` or `refused <message>`),
so that the launcher itself never imports torch. For a job whose roles are not forked (a party
may use CUDA), that is all the server does: it may have asked CUDA for its device count.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import IO

from fedtune import procctl
from fedtune.spec import FederatedFineTune, SpecError, parse_job

# The module whose `main(argv)` runs `fedtune ARGV` in a child: named, never imported statically,
# since the command line sits above the orchestration that starts its roles.
COMMAND_MODULE = "fedtune.cli"
# What every role would import anyway; importing it here is what the children share.
PRELOAD = ("torch", "transformers", "transformers.modeling_utils", "peft", "fedtune.federation.party",
           "fedtune.federation.scheduler", COMMAND_MODULE)


# --- the server -------------------------------------------------------------------------------


def _child(request: dict, in_session: int) -> None:
    """In the fork: become the role (own session, own log, own environment), run it, never return."""
    code = 1
    try:
        procctl.die_with_parent()
        os.setsid()
        os.close(in_session)  # tells the server the session exists: from now on killpg reaches it
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.environ.clear()
        os.environ.update(request["env"])
        gc.enable()
        command = importlib.import_module(COMMAND_MODULE)
        sys.argv = ["fedtune", *request["argv"]]
        code = command.main(request["argv"])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _reap(out: IO[str]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        out.write(f"exited {pid} {os.waitstatus_to_exitcode(status)}\n")
        out.flush()


def _check(request: dict) -> str:
    """The answer to a pre-flight check request (the job as JSON, each party's samples, the job's source)."""
    from fedtune.local.preflight import check_training, device_notes

    source = request["source"]
    try:
        job = parse_job(request["job"], source)
        check_training(job, request["samples"], source)
    except ValueError as err:  # SpecError, ModelError, ...: bad input, said as it was raised
        return f"refused {json.dumps(str(err))}"
    return f"checked {json.dumps(device_notes(job.spec))}"


def serve(title: str = "") -> None:
    procctl.tie_if_asked()
    if title:
        procctl.set_title(title)
    for module in PRELOAD:
        __import__(module)
    gc.collect()
    gc.freeze()
    gc.disable()  # the children enable it again; this loop makes almost no garbage
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    stdin = sys.stdin.fileno()
    pending = b""
    while True:
        readable, _, _ = select.select([stdin], [], [], 0.05)
        _reap(out)
        if not readable:
            continue
        chunk = os.read(stdin, 65536)
        if not chunk:  # the launcher is gone or done: children keep running until they end
            return
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            if "check" in request:
                out.write(_check(request["check"]) + "\n")
                out.flush()
                continue
            waiting, in_session = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(waiting)
                _child(request, in_session)
            os.close(in_session)
            os.read(waiting, 1)  # returns once the child has closed its end, after setsid
            os.close(waiting)
            out.write(f"started {request['id']} {pid}\n")
            out.flush()


# --- the launcher's side ----------------------------------------------------------------------


class Forked:
    """A role forked by the server, with the part of `subprocess.Popen` the launcher uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._done = threading.Event()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._done.wait(timeout):
            raise subprocess.TimeoutExpired(f"role {self.pid}", timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def _exited(self, code: int) -> None:
        self.returncode = code
        self._done.set()


class ForkServer:
    """Starts the server process (its imports run while the launcher goes on); `spawn` forks a role from it."""

    def __init__(self, env: dict[str, str], log: Path, title: str = "") -> None:
        self.log = log
        with log.open("ab") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "fedtune.local.forkserver", title],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env,
                                         text=True, bufsize=1, start_new_session=True)
        self.ready = False
        self._lock = threading.Lock()
        self._started: dict[int, Forked] = {}
        self._by_pid: dict[int, Forked] = {}
        self._exits: dict[int, int] = {}  # exits that arrived before their start was recorded
        self._ready = threading.Condition(self._lock)
        self._next = 0
        self._verdict: str | None = None  # the answer to a check request
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip() == "ready":
                with self._lock:
                    self.ready = True
                    self._ready.notify_all()
                continue
            if line.startswith(("checked", "refused")):
                with self._lock:
                    self._verdict = line.rstrip("\n")
                    self._ready.notify_all()
                continue
            kind, key, value = line.split()
            with self._lock:
                if kind == "started":
                    forked = Forked(int(value))
                    self._by_pid[forked.pid] = forked
                    self._started[int(key)] = forked
                    if forked.pid in self._exits:
                        forked._exited(self._exits.pop(forked.pid))
                    self._ready.notify_all()
                elif int(key) in self._by_pid:
                    self._by_pid[int(key)]._exited(int(value))
                else:
                    self._exits[int(key)] = int(value)
        with self._lock:  # the server died: no exit will be reported again
            for forked in self._by_pid.values():
                if forked.returncode is None:
                    forked._exited(-signal.SIGKILL)
            self._ready.notify_all()

    def _failed(self, what: str) -> RuntimeError:
        tail = self.log.read_text(errors="replace").splitlines()[-15:] if self.log.exists() else []
        return RuntimeError("\n".join([f"the role fork server {what} (its log, {self.log}, ends:)", *tail]))

    def _send(self, request: dict, timeout_s: float) -> None:
        """Write one request once the server's imports are done (the caller holds the lock)."""
        assert self.proc.stdin is not None
        self._ready.wait_for(lambda: self.ready or self.proc.poll() is not None, timeout_s)
        if not self.ready:
            raise self._failed("did not start")
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()

    def check(self, job: FederatedFineTune, samples: dict[str, int], source: str,
              timeout_s: float = 600.0) -> list[str]:
        """`preflight.check_training` run in the server; its SpecError raised here as it was raised there.
        What it notes for the user (`preflight.device_notes`)."""
        with self._lock:
            self._verdict = None
            self._send({"check": {"job": job.model_dump(mode="json", exclude_unset=True), "samples": samples,
                                  "source": source}}, timeout_s)
            if not self._ready.wait_for(lambda: self._verdict is not None or self.proc.poll() is not None,
                                        timeout_s):
                raise RuntimeError("the role fork server did not answer the pre-flight check in time")
            verdict = self._verdict
        if verdict is None:
            raise self._failed(f"exited with {self.proc.returncode} during the pre-flight check")
        kind, _, detail = verdict.partition(" ")
        if kind != "checked":
            raise SpecError(json.loads(detail))
        return json.loads(detail) if detail else []

    def spawn(self, argv: list[str], env: dict[str, str], log: Path, timeout_s: float = 600.0) -> Forked:
        """Fork a role running `fedtune ARGV...`; waits for the server's imports the first time."""
        with self._lock:
            self._next += 1
            key = self._next
            self._send({"id": key, "argv": argv, "env": env, "log": str(log)}, timeout_s)
            if not self._ready.wait_for(lambda: key in self._started or self.proc.poll() is not None, timeout_s):
                raise RuntimeError("the role fork server did not fork in time")
            if key not in self._started:
                raise RuntimeError(f"the role fork server exited with {self.proc.returncode}")
            return self._started.pop(key)

    def stop(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    serve(sys.argv[1] if len(sys.argv) > 1 else "")
    # Without the interpreter's teardown of torch and transformers: over a second of CPU, paid at every
    # run's end (and twice by a run stopped and resumed); nothing is left to flush but stdout.
    sys.stdout.flush()
    os._exit(0)
