"""Differential privacy: each update is clipped to C, the parties' noise sums to σ times the sensitivity, ε is
what the accountant library gives."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedtune import privacy
from fedtune.spec import load_job, parse_job
from support.jobs import EXAMPLE

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


@pytest.mark.parametrize(("parties", "honest"), [(4, 4), (5, 3), (3, 1)])
def test_the_honest_parties_noise_on_the_sum_is_sigma_times_the_sensitivity(parties: int, honest: int) -> None:
    """Parties whose updates equal the round's start send only their weighted start plus noise: what the sum of
    the `honest` ones carries beyond the weighted starts is the noise, and its std is σ·C/n, σ times the
    sensitivity C/n of uniform weights, whatever the others add."""
    sigma, clip_norm = 1.3, 0.05
    std = privacy.party_noise_std(sigma, clip_norm, parties, honest)
    rng = np.random.default_rng(7)
    start = {"w": rng.standard_normal(200_000).astype(np.float32) * 0.01}
    total = sum(privacy.privatize(start, start, 1 / parties, clip_norm=clip_norm, noise_std=std, rng=rng)["w"]
                .astype(np.float64) for _ in range(honest))
    noise = total - honest / parties * start["w"].astype(np.float64)
    expected = sigma * clip_norm / parties
    # 200,000 samples: the sample std is within 1% of the true one with overwhelming probability.
    assert float(noise.std()) == pytest.approx(expected, rel=0.01)
    assert abs(float(noise.mean())) < 5 * expected / math.sqrt(noise.size)


@pytest.mark.parametrize(
    ("encryption", "calibration"),
    [
        ({"plain": {}}, (3, 1)),  # the host sees each update: each party's noise must do alone
        ({"otp": {}}, (3, 2)),  # every sum holds both label_trainers
        ({"otp": {"max_colluders": 1}}, (3, 1)),
        ({"secagg_plus": {}}, (3, 2)),  # t = 2 of 2
    ],
)
def test_each_party_calibrates_on_the_honest_parties_its_own_file_guarantees(encryption: dict,
                                                                              calibration: tuple) -> None:
    """(training parties, honest label_trainers) from the job file alone: the assist_trainer trains in the
    example, so n = 3; h is 1 in the clear, n_l - c under otp, t - c under secagg_plus."""
    job = load_job(EXAMPLE)
    spec = job.spec.model_copy(update={"encryption": type(job.spec.encryption).model_validate(encryption)})
    assert privacy.calibration(spec) == calibration
    assert privacy.honest_parties("secagg_plus", label_trainers=9, threshold=7, colluders=2) == 5
    assert privacy.party_noise_std(2.0, 0.5, 4, 4) == pytest.approx(2.0 * 0.5 / 4 / 2)


def test_a_party_refuses_a_weight_its_own_file_does_not_give() -> None:
    """A host that weighs a party 0.1 where its file names 3 training parties (so it could have made another
    party's weight, hence the sensitivity, larger than the party's noise is calibrated for) is refused."""
    privacy.check_weight("node-1", 1 / 3, 3)
    with pytest.raises(ValueError, match=r"privacy.dp: the host weighs node-1 0.1, not 1/3 as the 3 training "
                                         r"parties of its own job file do \(uniform weights\); refusing"):
        privacy.check_weight("node-1", 0.1, 3)


def test_privacy_dp_makes_weights_uniform_and_keeps_losses_from_the_host() -> None:
    """Under privacy.dp the weights default to uniform, sample weights are refused (see test_spec), and the
    losses default to `none`."""
    document = load_job(EXAMPLE).model_dump(mode="json")
    document["spec"]["privacy"] = {"dp": {"clip_norm": 1.0, "noise_multiplier": 1.0}}
    document["spec"]["aggregation"].pop("weighting", None)
    spec = parse_job(document).spec
    assert spec.aggregation.weighting == "uniform" and spec.privacy.losses == "none"
    document["spec"]["privacy"]["losses"] = "aggregate"
    assert parse_job(document).spec.privacy.losses == "aggregate"


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
    report = privacy.report(3, 1.0, 0.1, 1e-5, honest=2)
    assert report["epsilon"] == privacy.epsilon(3, 1.0, 1e-5) and report["rounds"] == 3
    assert report["honest_parties"] == 2 and report["weighting"] == "uniform"
