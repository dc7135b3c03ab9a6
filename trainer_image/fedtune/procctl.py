"""How fedtune's processes look and end (Linux; elsewhere these do nothing).

`set_title`: what `ps` and `top` show for a process (`fedtune poems-lora label_trainer node-1`),
instead of every role being `python -m fedtune.local.forkserver`. `die_with_parent`: a process started
by `fedtune run` ends when the process that started it dies, even by SIGKILL, so that nothing of a
killed run keeps training or holding a port. `python -m fedtune.procctl PROGRAM ARGS...` runs a
program that is not ours (redis-server) with that tie.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
COMM_LEN = 15  # the kernel keeps this many bytes of a thread's name (top, ps -o comm)
TIED_ENV = "FEDTUNE_DIE_WITH_PARENT"  # set by `fedtune run` for what it starts: each ties itself to its parent

_LINUX = sys.platform.startswith("linux")


def _prctl(option: int, value: int | bytes) -> None:
    if _LINUX:
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def die_with_parent(sig: int = signal.SIGTERM, parent: int | None = None) -> None:
    """Have the kernel send `sig` when the parent (`parent`, when known) dies; end now if it has already.

    The kernel watches the parent's thread that started this process: its end counts as the parent's."""
    if not _LINUX:
        return
    parent = parent or os.getppid()
    _prctl(PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:
        os._exit(128 + sig)


def tie_if_asked() -> None:
    """`die_with_parent` for a process whose launcher asked for it in the environment."""
    if os.environ.get(TIED_ENV) == "1":
        die_with_parent()


def _argv_area() -> tuple[int, int] | None:
    """Where the kernel reads /proc/self/cmdline from: the original argv (fields 48, 49 of stat)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[45]), int(fields[46])
    except (OSError, ValueError, IndexError):
        return None


def set_title(title: str) -> None:
    """Show `title` as this process's command line (as far as its original argv's room allows) and name.

    CPython copied argv at start and never reads the original again, so it may be overwritten, as
    setproctitle does."""
    if not _LINUX:
        return
    with contextlib.suppress(OSError):
        _prctl(PR_SET_NAME, title.encode()[:COMM_LEN])
    area = _argv_area()
    if area is None or area[1] <= area[0]:
        return
    start, end = area
    text = title.encode()[: end - start - 1]
    ctypes.memset(start, 0, end - start)
    ctypes.memmove(start, text, len(text))


def title_of(job: str, role: str, party: str | None = None) -> str:
    """`fedtune JOB ROLE [PARTY]`: how a job's processes show in ps (the party only where it differs)."""
    parts = ["fedtune", job, role] + ([party] if party and party != role else [])
    return " ".join(parts)


def _exec_tied(argv: list[str]) -> None:
    die_with_parent()
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    _exec_tied(sys.argv[1:])
