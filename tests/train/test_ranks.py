"""A party training data-parallel over several ranks (gloo on the CPU), and what is refused before it starts."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from fedtune.federation.party import STATE_DIR
from fedtune.local.launcher import LocalJob, gpu_slices, with_party_ranks
from fedtune.spec import SpecError, load_job
from fedtune.train.loop import latest_state
from support.jobs import PARTIES, adapter_tensors, assert_identical_adapters, run_cli, wait_until, write_job

# node-1 holds most data, so it is still training when it is killed after round 1, and rounds
# 2 and 3 come after its restart: its second rank must take those global adapters from rank 0.
SIZES = (16, 48, 16)
CHECKPOINTS = ("checkpoint-0.25", "checkpoint-0.5", "checkpoint-0.75", "checkpoint-1")
TWO_RANKS = {"node-1": {"ranks": 2, "trainer": {"per_device_train_batch_size": 2}}}  # global batch 4, as one rank


@pytest.mark.slow
def test_two_ranks_end_like_one_rank_with_the_same_global_batch_and_resume(tmp_path: Path, tiny_model: Path) -> None:
    one = write_job(tmp_path / "one", tiny_model, sizes=SIZES, agg_steps=0.25, epochs=1)
    done = run_cli("run", str(one), "--output", str(tmp_path / "one-out"))
    assert done.returncode == 0, done.stdout + done.stderr

    two = write_job(tmp_path / "two", tiny_model, sizes=SIZES, agg_steps=0.25, epochs=1, party_overrides=TWO_RANKS)
    local = LocalJob(load_job(two), tmp_path / "two-out", two.parent)
    state_dir = local.output / "node-1" / STATE_DIR / "trainer"
    try:
        local.start()
        wait_until(lambda: latest_state(state_dir) is not None, 240, "node-1 to save its state after round 1", local)
        local.kill_role("node-1", signal.SIGKILL)  # torchrun and, with it, both ranks
        saved = latest_state(state_dir)
        assert saved is not None and local.status().parties["node-1"].state != "succeeded"
        # Written once: rank 0's adapter, optimizer and trainer state, and each rank's RNG state.
        assert sorted(p.name for p in saved.iterdir()) == [
            "adapter_state.safetensors", "optimizer.pt", "rng_state_0.pth", "rng_state_1.pth", "scheduler.pt",
            "trainer_state.json"]
        local.start_role("node-1")
        wait_until(local.finished, 300, "the job to finish after node-1's restart", local)
        assert local.status().phase == "Succeeded"
    finally:
        local.stop()
    log = (local.run_dir / "logs" / "node-1.log").read_text()
    assert "node-1[rank 1]" in log and "resuming from its saved state" in log

    for checkpoint in CHECKPOINTS:
        assert_identical_adapters(local.output, checkpoint)
        expected = adapter_tensors(tmp_path / "one-out" / PARTIES[0] / checkpoint)
        got = adapter_tensors(local.output / PARTIES[0] / checkpoint)
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():
            torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-6, msg=f"{checkpoint}: {name}")
    assert sorted(p.name for p in (local.output / "node-1").iterdir()) == list(CHECKPOINTS)


def test_more_ranks_than_devices_is_refused_naming_the_field(tmp_path: Path, tiny_model: Path) -> None:
    job = write_job(tmp_path / "job", tiny_model)
    done = run_cli("run", str(job), "--output", str(tmp_path / "out"), "--gpus-per-party", "64")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "spec.parties[0].resources.gpu: 64" in done.stderr
    assert not (tmp_path / "out").exists()

    # A party started on its own (as in a pod) refuses before it contacts anyone.
    gpus = write_job(tmp_path / "pod", tiny_model, party_overrides={"node-1": {"resources": {"gpu": 64}}})
    done = run_cli("label-trainer", "--job", str(gpus), "--party", "node-1", "--output", str(tmp_path / "pod-out"),
                   "--insecure")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "spec.parties[1].resources.gpu: 64" in done.stderr
    assert not (tmp_path / "pod-out").exists()


def test_run_options_set_every_local_training_party(tmp_path: Path, tiny_model: Path) -> None:
    path = write_job(tmp_path / "job", tiny_model, party_overrides={"assist_trainer": {"trainset": None}})
    job = with_party_ranks(load_job(path), str(path), gpus=2, ranks=2)
    spec = job.spec
    assert [spec.ranks(p) for p in spec.parties] == [1, 2, 2]  # the assist_trainer only aggregates
    assert [p.resources.gpu for p in spec.parties] == [0, 2, 2]
    assert with_party_ranks(load_job(path), str(path)) == load_job(path)
    with pytest.raises(SpecError, match=r"spec.parties\[1\].ranks"):
        with_party_ranks(load_job(path), str(path), ranks=0)
    with pytest.raises(SpecError, match=r"`node-1` has ranks 4 but resources.gpu gives it 2 GPUs"):
        with_party_ranks(load_job(path), str(path), gpus=2, ranks=4)


def test_parties_get_gpus_of_their_own_and_share_only_when_too_few() -> None:
    assert gpu_slices(["0", "1", "2", "3"], {"a": 2, "b": 1}) == {"a": "0,1", "b": "2"}
    assert gpu_slices(["4", "7"], {"a": 2, "b": 1}) == {"a": "4,7", "b": "4"}
