"""Differential privacy of the global adapter: per-party clipping, noise split among the parties, ε.

Each round, a party's update (its adapter after the round's local training minus the global
adapter it started the round from) is clipped to L2 norm C (`privacy.dp.clip_norm`) over all
its tensors. The aggregate is the FedAvg-weighted sum of the clipped updates, so one party
moves it by at most w_max·C (the largest weight times C): that is its sensitivity. Before
masking, each label_trainer adds Gaussian noise to its weighted update so that the sum carries
noise of standard deviation σ·w_max·C (σ = `noise_multiplier`), split among the k
label_trainers sure to be in every round's sum (all of them; under `secagg_plus`, its
threshold): std σ·w_max·C/√k each. The assist_trainer adds none: as the aggregator it would
know it. With equal weights that is noise of std σ·C on the sum of the clipped updates.

The guarantee is per party (its whole contribution to a round): each round is a Gaussian
mechanism of noise multiplier σ in which every party takes part, and ε for `delta` after r
rounds is what Opacus's RDP accountant gives for that (the optional `dp` extra). Without
secure aggregation the aggregator sees each update with only its share of the noise.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

Tensors = dict[str, np.ndarray]
ACCOUNTANT = "rdp (opacus)"


def l2_norm(tensors: Tensors) -> float:
    return math.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in tensors.values()))


def clip(update: Tensors, clip_norm: float) -> Tensors:
    """`update` scaled down to L2 norm `clip_norm` when it is longer (over all tensors together)."""
    norm = l2_norm(update)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: (v * scale).astype(v.dtype) for k, v in update.items()}


def party_noise_std(noise_multiplier: float, clip_norm: float, max_weight: float, noisy_parties: int) -> float:
    """The std each of `noisy_parties` adds so that their sum has std σ·w_max·C."""
    return noise_multiplier * max_weight * clip_norm / math.sqrt(noisy_parties)


def noisy_parties(scheme: str, label_trainers: int, threshold: int) -> int:
    """How many label_trainers' noise every round's sum is sure to hold."""
    return threshold if scheme == "secagg_plus" else label_trainers


def privatize(adapter: Tensors, start: Tensors, weight: float, *, clip_norm: float, noise_std: float,
              rng: np.random.Generator) -> Tensors:
    """What a party sends under DP: weight · (start + its update clipped to `clip_norm`), plus its noise."""
    update = clip({k: adapter[k].astype(np.float64) - start[k] for k in adapter}, clip_norm)
    out = {}
    for k, values in adapter.items():
        weighted = weight * (start[k] + update[k])
        if noise_std > 0:
            weighted += rng.normal(0.0, noise_std, values.shape)
        out[k] = weighted.astype(np.float32)
    return out


def _rdp_accountant() -> Any:
    try:
        from opacus.accountants import RDPAccountant
    except ImportError:
        raise ImportError("privacy.dp needs the accountant library: pip install 'fedtune[dp]' (opacus)") from None
    return RDPAccountant()


def check_accountant() -> None:
    """Fail at the start of a job, not after its first round, when the accountant is missing."""
    _rdp_accountant()


def epsilon(rounds: int, noise_multiplier: float, delta: float) -> float | None:
    """ε after `rounds` rounds at `delta`; None when no noise is added (no finite ε)."""
    if rounds < 1:
        return 0.0
    if noise_multiplier <= 0:
        return None
    accountant = _rdp_accountant()
    for _ in range(rounds):
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=1.0)
    return float(accountant.get_epsilon(delta))


def report(rounds: int, noise_multiplier: float, clip_norm: float, delta: float) -> dict[str, Any]:
    """What the job status shows (Redis `privacy`, summary.json, the resource's status)."""
    return {"epsilon": epsilon(rounds, noise_multiplier, delta), "delta": delta, "rounds": rounds,
            "noise_multiplier": noise_multiplier, "clip_norm": clip_norm, "accountant": ACCOUNTANT}
