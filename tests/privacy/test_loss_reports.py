"""What the host learns of the parties' losses: each one's (`privacy.losses: plain`), only their mean, masked
with the updates (`aggregate`), or nothing (`none`), in whole jobs under `fedtune run`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from support.jobs import run_cli, write_job

pytestmark = pytest.mark.slow
OTP = {"otp": {"key_bitlength": 64, "key_exchange": {"curve": "x25519"}, "csprng": {"name": "chacha20"}}}


@pytest.mark.parametrize("losses", ["aggregate", "none"])
def test_the_host_learns_only_what_privacy_losses_allows(tmp_path: Path, tiny_model: Path, losses: str) -> None:
    job = write_job(tmp_path / "job", tiny_model, encryption=OTP, epochs=1, privacy={"losses": losses},
                    trainer={"per_device_train_batch_size": 4, "learning_rate": 1e-2, "num_train_epochs": 1,
                             "no_cuda": True, "seed": 7, "logging_steps": 1})
    done = run_cli("run", str(job), "--output", str(tmp_path / "out"))
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    # What the scheduler recorded of each party (the host's view): no loss of any party.
    assert all(party["losses"] == [] for party in summary["parties"].values()), summary["parties"]
    if losses == "none":
        assert summary["round_losses"] == []
        return
    rounds = summary["round_losses"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(math.isfinite(r["loss"]) and 0 < r["loss"] < 20 for r in rounds), rounds
