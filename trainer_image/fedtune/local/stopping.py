"""How `fedtune run` takes SIGTERM, SIGINT and SIGHUP: the first stops the job cleanly, a second at once.

The first signal raises `Interrupted` where the launcher is, so that it stops every process it started,
writes the summary and says how to continue; it exits 128 + the signal's number (143, 130, 129). While
it is stopping already (the job ended, or a first signal came), a signal only notes itself. A second one
calls `kill_now` (SIGKILL to everything, the private folders removed) and exits at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType, TracebackType

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Interrupted(Exception):
    """`fedtune run` was asked to stop by a signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Signals:
    """The handlers, while the launcher runs a job (main thread only: elsewhere they stay as they are)."""

    def __init__(self, kill_now: Callable[[], None]) -> None:
        self.kill_now = kill_now
        self.received: int | None = None
        self.stopping = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            self.kill_now()
            print(f"fedtune: {signal.Signals(signum).name} again: every process of the run killed at once",
                  file=sys.stderr, flush=True)
            os._exit(128 + self.received)
        self.received = signum
        if not self.stopping:
            self.stopping = True
            raise Interrupted(signum)
