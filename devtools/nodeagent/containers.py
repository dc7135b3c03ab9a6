"""One container as a host process in its pod's namespaces: start, watch, stop, report.

A container is `nsenter` into the pod's network namespace, `unshare` of a private mount,
UTS and IPC namespace, then `podinit.py`, which builds the root and execs the command:
one process id from start to exit, so its exit status is the container's. It leads its
own session (the agent signals the whole process group) and dies with the agent
(parent-death signal), so a crashed agent leaves no container running.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .kubeapi import now_rfc3339
from .podinit import START_ERROR_EXIT

PODINIT = Path(__file__).resolve().parent / "podinit.py"
PR_SET_PDEATHSIG = 1
# What a kubelet keeps of a log as termination message (FallbackToLogsOnError).
MESSAGE_LINES = 80
MESSAGE_BYTES = 2048


def _child_setup() -> None:
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _tail(path: Path) -> str:
    with contextlib.suppress(OSError):
        data = path.read_bytes()[-16384:].decode("utf-8", "replace")
        return "\n".join(data.splitlines()[-MESSAGE_LINES:])[-MESSAGE_BYTES:]
    return ""


@dataclass
class Container:
    """A container's runtime state, in the shape of a containerStatus."""

    name: str
    spec: dict[str, Any]
    folder: Path
    state: str = "waiting"  # waiting | running | terminated
    reason: str = "ContainerCreating"
    message: str = ""
    exit_code: int | None = None
    started_at: str | None = None
    finished_at: str | None = None
    restart_count: int = 0
    ran: bool = False  # started at least once
    last_state: dict[str, Any] | None = None
    next_start: float = 0.0  # monotonic time before which a restart waits (back-off)
    process: subprocess.Popen[bytes] | None = None
    gpu_ids: list[int] = field(default_factory=list)

    # --- files ---------------------------------------------------------------------------------

    @property
    def log(self) -> Path:
        """Like /var/log/pods/<pod>/<container>/<restart>.log."""
        return self.folder / f"{self.restart_count}.log"

    @property
    def termination_log(self) -> Path:
        return self.folder / "termination-log"

    @property
    def start_error(self) -> Path:
        return self.folder / "start-error"

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self, netns: str, config: dict[str, Any], on_exit: Callable[[], None]) -> None:
        """Launch; `config` is what podinit needs (mounts, env, argv, ...)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        scratch = self.folder / "rootfs"
        scratch.mkdir(exist_ok=True)
        self.termination_log.write_bytes(b"")
        self.start_error.write_bytes(b"")
        config = {**config, "scratch": str(scratch), "startError": str(self.start_error)}
        config_path = self.folder / "config.json"
        # It holds the resolved environment (Secrets included): root only.
        fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(config, handle)
        argv = [
            "nsenter", f"--net=/run/netns/{netns}", "--",
            "unshare", "--mount", "--uts", "--ipc", "--propagation", "private", "--",
            sys.executable, str(PODINIT), str(config_path),
        ]  # fmt: skip
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_child_setup
            )
        self.state, self.reason, self.message = "running", "", ""
        self.exit_code, self.finished_at, self.ran = None, None, True
        self.started_at = now_rfc3339()
        process = self.process

        def wait() -> None:
            process.wait()
            on_exit()

        threading.Thread(target=wait, name=f"wait {self.name}", daemon=True).start()

    def poll(self) -> bool:
        """True when the running process just ended (the state is then `terminated`)."""
        if self.state != "running" or self.process is None or self.process.poll() is None:
            return False
        code = self.process.returncode
        self.exit_code = 128 - code if code < 0 else code  # killed by signal N -> 128+N
        self.finished_at = now_rfc3339()
        self.state = "terminated"
        start_error = self.start_error.read_text(errors="replace").strip() if self.start_error.exists() else ""
        if code == START_ERROR_EXIT and start_error:
            self.reason, self.message = "StartError", start_error
        else:
            self.reason = "Completed" if self.exit_code == 0 else "Error"
            self.message = self._termination_message()
        return True

    def _termination_message(self) -> str:
        with contextlib.suppress(OSError):
            text = self.termination_log.read_text(errors="replace")[:4096].strip()
            if text:
                return text
        if self.exit_code and self.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            return _tail(self.log)
        return ""

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, sig)

    def stop(self, grace_s: float) -> None:
        """SIGTERM the container's process group; SIGKILL it after `grace_s` seconds."""
        if self.process is None:
            return
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)

    def retire(self) -> None:
        """Before a restart: the current run becomes lastState, the next log file starts."""
        self.last_state = {"terminated": self._terminated()}
        self.restart_count += 1

    def _terminated(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
            "containerID": self.container_id,
        }
        if self.message:
            out["message"] = self.message
        return out

    @property
    def container_id(self) -> str:
        pid = self.process.pid if self.process is not None else 0
        return f"fedtune-nodeagent://{self.folder.parent.name}-{self.name}-{self.restart_count}-{pid}"

    def status(self) -> dict[str, Any]:
        """The containerStatus a kubelet would report."""
        if self.state == "running":
            state: dict[str, Any] = {"running": {"startedAt": self.started_at}}
        elif self.state == "terminated":
            state = {"terminated": self._terminated()}
        else:
            state = {"waiting": {"reason": self.reason, **({"message": self.message} if self.message else {})}}
        image = self.spec.get("image", "")
        out: dict[str, Any] = {
            "name": self.name,
            "image": image,
            "imageID": "",
            "ready": self.state == "running",
            "started": self.state == "running",
            "restartCount": self.restart_count,
            "state": state,
            "lastState": self.last_state or {},
        }
        if self.ran:
            out["containerID"] = self.container_id
        return out
