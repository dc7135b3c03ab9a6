"""What /proc says about a job's processes: how long one has run, and the memory they hold.

Memory is the proportional set size (PSS), sampled while the job runs.

PSS counts each private page once and each page shared by n processes as 1/n in every one
of them, so the PSS of all the processes adds up to what the job really occupies (RSS would
count torch's shared libraries once per process). A role counts with every process it
started (torchrun's ranks). Linux only: elsewhere every reading is None.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

PROC = Path("/proc")


def process_age_s() -> float:
    """Seconds since this process started (its interpreter start and imports included); 0 if unknown."""
    started = start_ticks(os.getpid())
    try:
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started / os.sysconf("SC_CLK_TCK") if started else 0.0
    except (OSError, ValueError, AttributeError):
        return 0.0


def start_ticks(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot): with the pid, it names one process, never a later
    one that got the same pid. None when there is no such process."""
    try:
        return int((PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = list((PROC / str(pid) / "task").iterdir())
    except OSError:  # it exited while the tree was walked
        return found
    for task in tasks:
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return found


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants that are alive now."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += _children(current)
    return tree


def pss_bytes(pid: int) -> int | None:
    """The process's PSS now; None when it is gone or the kernel does not say."""
    try:
        text = (PROC / str(pid) / "smaps_rollup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return None


def tree_pss_bytes(pid: int, counted: set[int] | None = None) -> int | None:
    """PSS of `pid` and its descendants, but those in `counted`; adds the ones it counts to it."""
    counted = set() if counted is None else counted
    tree = [p for p in process_tree(pid) if p not in counted]
    counted.update(tree)
    readings = [pss_bytes(p) for p in tree]
    known = [r for r in readings if r is not None]
    return sum(known) if known else None


class PeakMemory:
    """The highest PSS seen per role (with its processes) and for all of them together."""

    def __init__(self) -> None:
        self.peaks: dict[str, int] = {}
        self.total_peak = 0

    def sample(self, pids: Iterable[tuple[str, int]]) -> None:
        """One reading; a process that is also under an earlier one of `pids` counts only there."""
        total = 0
        counted: set[int] = set()
        for name, pid in pids:
            now = tree_pss_bytes(pid, counted)
            if now is None:
                continue
            self.peaks[name] = max(self.peaks.get(name, 0), now)
            total += now
        self.total_peak = max(self.total_peak, total)

    def report(self) -> dict[str, float | None]:
        """Peak PSS in MB (10^6 bytes) per role, and `job` for the whole job at one moment."""
        mb = {name: round(peak / 1e6, 1) for name, peak in self.peaks.items()}
        return {**mb, "job": round(self.total_peak / 1e6, 1) if self.peaks else None}
