"""A 3-party job with FedAdam under secagg_plus: it completes, and its first global adapter is the server step
along the mean that the same job under FedAvg (and one-time pads) adopts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from support.jobs import PARTIES, adapter_tensors, assert_identical_adapters, run_cli, write_job

pytestmark = pytest.mark.slow
OTP = {"otp": {"key_bitlength": 64, "key_exchange": {"curve": "x25519"}, "csprng": {"name": "chacha20"}}}
SECAGG_PLUS = {"secagg_plus": OTP["otp"]}
FEDADAM = {"name": "fedadam", "server_lr": 0.02, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}


def run_job(folder: Path, model: Path, encryption: dict, strategy: dict) -> Path:
    job = write_job(folder, model, encryption=encryption, epochs=1,
                    aggregation={"agg_steps": 0.5, "round_timeout_s": 120, "strategy": strategy})
    out = folder / "out"
    done = run_cli("run", str(job), "--output", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_fedadam_job_takes_the_server_step_along_fedavgs_mean(tmp_path: Path, tiny_model: Path) -> None:
    fedavg = run_job(tmp_path / "fedavg", tiny_model, OTP, {"name": "fedavg"})
    fedadam = run_job(tmp_path / "fedadam", tiny_model, SECAGG_PLUS, FEDADAM)
    # Both jobs start from the same initial adapter (same seed) and train round 1 alike, so FedAvg's first
    # global adapter is FedAdam's round-1 mean. LoRA's B matrices start at zero (peft's initialisation), so
    # there Δ = that mean, and the first step is lr (1 - b1) Δ / (sqrt(b2 tau^2 + (1 - b2) Δ^2) + tau)
    # (m from 0, v from tau^2).
    mean = assert_identical_adapters(fedavg, "checkpoint-0.5")
    stepped = assert_identical_adapters(fedadam, "checkpoint-0.5")
    lr, b1, b2, tau = (FEDADAM[k] for k in ("server_lr", "beta1", "beta2", "tau"))
    b_names = [name for name in mean if "lora_B" in name]
    assert b_names, f"no LoRA B matrices in {sorted(mean)}"
    for name in b_names:
        delta = mean[name].double().numpy()
        expected = lr * (1 - b1) * delta / (np.sqrt(b2 * tau**2 + (1 - b2) * delta**2) + tau)
        got = stepped[name].double().numpy()
        # The two means differ by the masks' fixed point (3 terms, 2^-32 each, in each job) and float32 rounding.
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=name)
        assert not np.allclose(got, delta, atol=1e-4), f"{name}: FedAdam took FedAvg's mean as it is"
    for name in mean:
        if name not in b_names:
            assert not np.allclose(stepped[name].numpy(), mean[name].numpy(), atol=1e-4), name
    final = assert_identical_adapters(fedadam, "checkpoint-1", PARTIES)
    assert all(bool(np.isfinite(t.numpy()).all()) for t in final.values())
    assert not all(np.allclose(t.numpy(), adapter_tensors(fedavg / PARTIES[0] / "checkpoint-1")[n].numpy())
                   for n, t in final.items())
