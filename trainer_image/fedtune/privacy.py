"""Differential privacy of the global adapter against a dishonest host: clipping, each party's noise, ε.

Each round, a party's update (its adapter after the round's local training minus the global
adapter it started the round from) is clipped to L2 norm C (`privacy.dp.clip_norm`) over all
its tensors. Under DP the weights are uniform (`aggregation.weighting: uniform`, required):
each of the n training parties of the party's own job file weighs 1/n, so one party moves
the aggregate by at most C/n, its sensitivity, whatever the host says about anyone's data.
(With sample weights the sensitivity would be the largest weight times C, and the largest
weight rests on sample counts only the host sees.)

Before masking, each label_trainer adds Gaussian noise so that the noise of the honest parties
alone gives the sum std σ·C/n (σ = `noise_multiplier`): with h the honest label_trainers whose
noise every sum the host sees is sure to hold, by the party's own file,
- `plain`: h = 1 (the host sees each update on its own),
- `otp`: h = n_l - c (every sum holds all n_l label_trainers, c of them may collude: `max_colluders`),
- `secagg_plus`: h = t - c (every sum the host can unmask holds at least t uploads),
each adds std σ·C/(n·√h). The assist_trainer adds none: as the aggregator it would know it.

The guarantee is per party (its whole contribution to a round): each round is a Gaussian
mechanism of noise multiplier at least σ on every party's data, whatever the host and the c
colluders do, and ε for `delta` after r rounds is what Opacus's RDP accountant gives for that
(the optional `dp` extra): an upper bound under that threat model. The losses a party reports
are not part of it (`privacy.losses`, `none` by default under DP).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedtune.spec import JobSpec

Tensors = dict[str, np.ndarray]
ACCOUNTANT = "rdp (opacus)"


def l2_norm(tensors: Tensors) -> float:
    return math.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in tensors.values()))


def clip(update: Tensors, clip_norm: float) -> Tensors:
    """`update` scaled down to L2 norm `clip_norm` when it is longer (over all tensors together)."""
    norm = l2_norm(update)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: (v * scale).astype(v.dtype) for k, v in update.items()}


def party_noise_std(noise_multiplier: float, clip_norm: float, training_parties: int, honest: int) -> float:
    """The std each label_trainer adds so that `honest` of them give the sum std σ·C/n (n: the training parties)."""
    return noise_multiplier * clip_norm / training_parties / math.sqrt(honest)


def honest_parties(scheme: str, label_trainers: int, threshold: int, colluders: int) -> int:
    """How many honest label_trainers' noise every sum the host sees is sure to hold (see the module)."""
    if scheme == "plain":
        return 1
    return (threshold if scheme == "secagg_plus" else label_trainers) - colluders


def calibration(spec: JobSpec) -> tuple[int, int]:
    """(n, h) from a party's own job file: its training parties, and the honest label_trainers whose noise
    every sum the host sees holds."""
    masking = spec.encryption.masking
    colluders = masking.max_colluders if masking is not None else 0
    honest = honest_parties(spec.encryption.scheme, len(spec.label_trainers), spec.secagg_threshold(), colluders)
    return len(spec.training_parties()), honest


def check_weight(party: str, host_weight: float, training_parties: int) -> None:
    """Refuse a weight from the host other than the 1/n of the party's own file: the noise is calibrated on it."""
    if abs(host_weight - 1.0 / training_parties) > 1e-9:
        raise ValueError(f"privacy.dp: the host weighs {party} {host_weight:g}, not 1/{training_parties} as the "
                         f"{training_parties} training parties of its own job file do (uniform weights); refusing")


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


def report(rounds: int, noise_multiplier: float, clip_norm: float, delta: float, honest: int) -> dict[str, Any]:
    """What the job status shows (Redis `privacy`, summary.json, the resource's status)."""
    return {"epsilon": epsilon(rounds, noise_multiplier, delta), "delta": delta, "rounds": rounds,
            "noise_multiplier": noise_multiplier, "clip_norm": clip_norm, "accountant": ACCOUNTANT,
            "weighting": "uniform", "honest_parties": honest}
