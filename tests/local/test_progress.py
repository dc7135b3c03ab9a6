"""`fedtune run`'s live progress: a table redrawn in place on a terminal, calm lines elsewhere."""

from __future__ import annotations

import io

from fedtune.federation.jobstate import JobStatus, PartyStatus
from fedtune.local.launcher import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def status(node1_step: int, warnings: tuple[str, ...] = ()) -> JobStatus:
    parties = {
        "assist_trainer": PartyStatus("assist_trainer", state="training", round=1, step=7, max_steps=20, loss=1.5),
        "node-1": PartyStatus("node-1", state="training", round=1, step=node1_step, max_steps=30),
    }
    return JobStatus("job", phase="Running", rounds=5, warnings=list(warnings), parties=parties)


def test_terminal_gets_one_table_redrawn_in_place() -> None:
    out = Terminal()
    progress = Progress(out)
    progress.show(status(3))
    first = out.getvalue()
    assert first.splitlines() == ["  assist_trainer   training    round 1/5 step 7/20 loss 1.5000",
                                  "  node-1           training    round 1/5 step 3/30"]
    progress.show(status(3))
    assert out.getvalue() == first, "an unchanged table is not drawn again"
    progress.show(status(4, warnings=("TLS is off",)))
    redraw = out.getvalue()[len(first):]
    assert redraw.startswith("\x1b[2F\x1b[J"), "back up over the two rows and clear them"
    assert redraw.endswith("WARNING: TLS is off\n  assist_trainer   training    round 1/5 step 7/20 loss 1.5000\n"
                           "  node-1           training    round 1/5 step 4/30\n")


def test_logs_get_a_line_when_state_or_round_moves_and_no_escapes() -> None:
    out = io.StringIO()
    progress = Progress(out, every_s=3600)
    progress.show(status(3))
    progress.show(status(4))  # a step alone is not worth a log line
    moved = status(4)
    moved.parties["node-1"].round = 2
    progress.show(moved)
    lines = out.getvalue().splitlines()
    assert lines == ["  assist_trainer   training    round 1/5 step 7/20 loss 1.5000",
                     "  node-1           training    round 1/5 step 3/30",
                     "  node-1           training    round 2/5 step 4/30"]
    assert "\x1b" not in out.getvalue()
