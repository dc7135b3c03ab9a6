"""Differential privacy: each update is clipped to C, the parties' noise sums to σ times the sensitivity, ε is
what the accountant library gives."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedtune import privacy

SHAPES = {"lora_A": (8, 64), "lora_B": (64, 8)}


def _adapter(rng: np.random.Generator, scale: float) -> dict[str, np.ndarray]:
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in SHAPES.items()}


@pytest.mark.parametrize("scale", [1e-4, 1e-2, 1.0, 30.0])
def test_each_update_is_clipped_to_the_norm_and_keeps_its_direction(scale: float) -> None:
    rng = np.random.default_rng(int(scale * 1e4))
    start, local = _adapter(rng, 0.5), _adapter(rng, 0.5)
    adapter = {k: start[k] + scale * local[k] for k in SHAPES}
    clip_norm = 0.3
    sent = privacy.privatize(adapter, start, 1.0, clip_norm=clip_norm, noise_std=0.0, rng=rng)
    update = {k: sent[k].astype(np.float64) - start[k] for k in SHAPES}
    original = {k: adapter[k].astype(np.float64) - start[k] for k in SHAPES}
    norm, before = privacy.l2_norm(update), privacy.l2_norm(original)
    assert norm <= clip_norm * (1 + 1e-5)
    if before <= clip_norm:  # short updates pass unchanged (up to float32 rounding of the sum)
        assert all(np.allclose(update[k], original[k], rtol=0, atol=1e-6) for k in SHAPES)
    else:  # long ones are scaled, not cut: same direction, length C
        assert norm == pytest.approx(clip_norm, rel=1e-4)
        cosine = sum(float((update[k] * original[k]).sum()) for k in SHAPES) / (norm * before)
        assert cosine == pytest.approx(1.0, abs=1e-5)


def test_the_weight_applies_to_the_clipped_adapter() -> None:
    rng = np.random.default_rng(1)
    start, adapter = _adapter(rng, 0.1), _adapter(rng, 5.0)
    plain = privacy.privatize(adapter, start, 1.0, clip_norm=0.2, noise_std=0.0, rng=rng)
    weighted = privacy.privatize(adapter, start, 0.25, clip_norm=0.2, noise_std=0.0, rng=rng)
    assert all(np.allclose(weighted[k], 0.25 * plain[k], rtol=1e-6, atol=1e-7) for k in SHAPES)


@pytest.mark.parametrize(("weights", "noisy"), [([1.0] * 4, 4), ([0.4, 0.3, 0.2, 0.1], 4), ([0.25] * 5, 3)])
def test_the_noise_on_the_sum_is_sigma_times_the_sensitivity(weights: list[float], noisy: int) -> None:
    """Parties whose updates equal the round's start send only their weighted start plus noise: what the sum
    carries beyond the weighted starts is the noise, and its std is σ·w_max·C (σ·C for unit weights)."""
    sigma, clip_norm = 1.3, 0.05
    std = privacy.party_noise_std(sigma, clip_norm, max(weights), noisy)
    rng = np.random.default_rng(7)
    start = {"w": rng.standard_normal(200_000).astype(np.float32) * 0.01}
    total = sum(privacy.privatize(start, start, w, clip_norm=clip_norm, noise_std=std, rng=rng)["w"].astype(
        np.float64) for w in weights[:noisy])
    noise = total - sum(weights[:noisy]) * start["w"].astype(np.float64)
    expected = sigma * max(weights) * clip_norm
    # 200,000 samples: the sample std is within 1% of the true one with overwhelming probability.
    assert float(noise.std()) == pytest.approx(expected, rel=0.01)
    assert abs(float(noise.mean())) < 5 * expected / math.sqrt(noise.size)


def test_noise_is_split_among_the_parties_every_sum_holds() -> None:
    assert privacy.noisy_parties("secagg_plus", label_trainers=5, threshold=3) == 3
    assert privacy.noisy_parties("otp", label_trainers=5, threshold=3) == 5
    assert privacy.party_noise_std(2.0, 0.5, 0.25, 4) == pytest.approx(2.0 * 0.5 * 0.25 / 2)


@pytest.mark.parametrize(("sigma", "rounds", "delta"),
                         [(1.0, 1, 1e-5), (1.0, 5, 1e-5), (0.7, 10, 1e-6), (4.0, 50, 1e-5)])
def test_epsilon_is_the_accountants_for_the_same_mechanism(sigma: float, rounds: int, delta: float) -> None:
    """Computed here through Opacus's RDP analysis directly: `rounds` Gaussian mechanisms at sampling rate 1."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    from opacus.accountants.rdp import RDPAccountant

    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=1.0, noise_multiplier=sigma, steps=rounds, orders=orders)
    expected, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    assert privacy.epsilon(rounds, sigma, delta) == pytest.approx(expected, rel=1e-9)
    # For one round, the Gaussian mechanism's ε is also known in closed form from its RDP curve.
    if rounds == 1:
        closed = min(a / (2 * sigma**2) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
                     for a in orders if a > 1)
        assert privacy.epsilon(1, sigma, delta) == pytest.approx(closed, rel=1e-6)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise() -> None:
    assert privacy.epsilon(0, 1.0, 1e-5) == 0.0
    assert privacy.epsilon(2, 1.0, 1e-5) < privacy.epsilon(8, 1.0, 1e-5)
    assert privacy.epsilon(8, 2.0, 1e-5) < privacy.epsilon(8, 1.0, 1e-5)
    assert privacy.epsilon(3, 0.0, 1e-5) is None  # clipping alone: no finite ε
    report = privacy.report(3, 1.0, 0.1, 1e-5)
    assert report["epsilon"] == privacy.epsilon(3, 1.0, 1e-5) and report["rounds"] == 3
