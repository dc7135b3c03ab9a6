"""Federations of many parties under `fedtune run`: 32 label_trainers in the clear, 16 under secagg_plus.

Each party holds a few poems (one short epoch, two rounds), so the work is small and the test is of
what grows with the parties: start-up, the barriers (Ready, each round's Fetch), aggregation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.jobs import assert_identical_adapters, run_cli, write_job

pytestmark = pytest.mark.slow

SECAGG_PLUS = {"secagg_plus": {"key_bitlength": 64, "key_exchange": {"curve": "x25519"},
                               "csprng": {"name": "chacha20"}}}


def run_many(tmp_path: Path, model: Path, label_trainers: int, encryption: dict | None = None) -> dict:
    """A job of the assist_trainer and `label_trainers` label_trainers, 8 samples each; its summary once it
    succeeded with every party through both rounds and holding the same adapters."""
    job = write_job(tmp_path / "job", model, sizes=(8,) * (label_trainers + 1), agg_steps=0.5, epochs=1,
                    encryption=encryption, name=f"many-{label_trainers}")
    out = tmp_path / "out"
    done = run_cli("run", str(job), "--output", str(out), "--timeout", "1500", timeout=1700)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    parties = ("assist_trainer", *(f"node-{i}" for i in range(1, label_trainers + 1)))
    assert summary["phase"] == "Succeeded" and set(summary["parties"]) == set(parties)
    for name in parties:
        assert summary["parties"][name]["state"] == "succeeded", name
        assert [r["round"] for r in summary["parties"][name]["rounds"]] == [1, 2], name
    assert_identical_adapters(out, "checkpoint-1", parties)
    assert_identical_adapters(out, "checkpoint-0.5", parties)
    return summary


def test_thirty_two_label_trainers_in_the_clear(tmp_path: Path, tiny_model: Path) -> None:
    run_many(tmp_path, tiny_model, 32)


# A reveal that reaches the aggregator while it stores the round's global adapter is refused ("was not asked to
# reveal shares") and fails the job: issue 21's reveal race, made idempotent on its own branch. Not strict: it
# passes whenever the race is not hit, and always once that fix is in (then drop this mark).
def test_sixteen_label_trainers_under_secagg_plus(tmp_path: Path, tiny_model: Path) -> None:
    summary = run_many(tmp_path, tiny_model, 16, SECAGG_PLUS)
    dropped = {round_: names for round_, names in summary["dropouts"].items() if names}
    assert not dropped, f"no party may be dropped when none fails: {dropped}"
