"""How a round's updates become the global adapter: each party's weight, the mean, the server's step.

A party multiplies its update by its own weight before protecting it, so the codec's sum of a
round's uploads is already the weighted mean, or, when secagg_plus dropped parties, a share of
it that the survivors' weights undo. The strategy then takes the server's step from the last
global adapter along that mean: FedAvg adopts the mean; FedAdam and FedYogi treat
Δ = mean − global as a pseudo-gradient for a server-side adaptive optimizer (Reddi et al. 2021,
"Adaptive Federated Optimization", Algorithm 2, without bias correction, v starting at τ²).

The step sees only the unmasked sum, after the codec's combine, so it is the same under every
encryption scheme, and under privacy.dp it only post-processes the noised mean. Its state (the
moments m and v) is kept in Redis beside the round's global adapter, written in one transaction,
so a restarted aggregator steps on from where the last one stopped.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar, Literal

import numpy as np

from fedtune.federation import transport
from fedtune.federation.jobstate import JobState
from fedtune.spec import Aggregation

Tensors = dict[str, np.ndarray]
Weighting = Literal["samples", "uniform"]


class Strategy(ABC):
    name: ClassVar[str]
    stateful: ClassVar[bool] = False  # whether `step` reads the last global adapter and its own state

    def __init__(self, weighting: Weighting = "samples") -> None:
        self.weighting = weighting

    def weights(self, samples: Mapping[str, int]) -> dict[str, float]:
        """Each training party's share of the mean (they sum to 1): by samples, or the plain mean."""
        training = {name: n for name, n in samples.items() if n > 0}
        if self.weighting == "uniform":
            return {name: 1.0 / len(training) for name in training}
        total = sum(training.values())
        return {name: n / total for name, n in training.items()}

    @staticmethod
    def mean(total: Tensors, share: float) -> Tensors:
        """The mean from the codec's sum of weighted updates, which carries `share` of the weights
        (1 unless parties dropped out: then the mean is over the survivors' own weights)."""
        if share == 1.0:
            return total
        return {k: (v.astype(np.float64) / share).astype(np.float32) for k, v in total.items()}

    @abstractmethod
    def step(self, mean: Tensors, previous: Tensors, moments: Tensors) -> tuple[Tensors, Tensors]:
        """The new global adapter from the round's mean, the last global adapter and the strategy's state
        after the last round (empty at first); and its state after this round (empty when it keeps none)."""

    def finish(self, state: JobState, round_: int, total: Tensors, share: float) -> tuple[bytes, bytes | None]:
        """Round `round_`'s global adapter, packed, and the strategy's state after it (None when it keeps none):
        what `JobState.put_global` stores together."""
        mean = self.mean(total, share)
        if not self.stateful:
            return transport.pack_tensors(mean), None
        previous = state.get_global(round_ - 1)
        assert previous is not None, f"round {round_ - 1}'s global adapter is gone"  # globals are never deleted
        saved = state.get_strategy_state(round_ - 1)
        new, moments = self.step(mean, transport.unpack_tensors(previous),
                                 transport.unpack_tensors(saved) if saved else {})
        return transport.pack_tensors(new), transport.pack_tensors(moments)

    def describe(self) -> str:
        return f"{self.name}, parties weighted {'by samples' if self.weighting == 'samples' else 'equally'}"


class FedAvg(Strategy):
    """The mean is the new global adapter."""

    name = "fedavg"

    def step(self, mean: Tensors, previous: Tensors, moments: Tensors) -> tuple[Tensors, Tensors]:
        return mean, {}


class FedAdam(Strategy):
    """Adam on the server: m ← β1·m + (1−β1)·Δ, v ← β2·v + (1−β2)·Δ², x ← x + η·m / (√v + τ)."""

    name = "fedadam"
    stateful = True

    def __init__(self, weighting: Weighting = "samples", *, server_lr: float, beta1: float, beta2: float,
                 tau: float) -> None:
        super().__init__(weighting)
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau

    def step(self, mean: Tensors, previous: Tensors, moments: Tensors) -> tuple[Tensors, Tensors]:
        new, state = {}, {}
        for key, average in mean.items():
            x = previous[key].astype(np.float64)
            delta = average.astype(np.float64) - x
            m = moments[f"m:{key}"].astype(np.float64) if f"m:{key}" in moments else np.zeros_like(x)
            v = moments[f"v:{key}"].astype(np.float64) if f"v:{key}" in moments else np.full_like(x, self.tau**2)
            m = self.beta1 * m + (1 - self.beta1) * delta
            v = self.second_moment(v, delta)
            new[key] = (x + self.server_lr * m / (np.sqrt(v) + self.tau)).astype(np.float32)
            state[f"m:{key}"], state[f"v:{key}"] = m.astype(np.float32), v.astype(np.float32)
        return new, state

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1 - self.beta2) * delta**2

    def describe(self) -> str:
        return (f"{super().describe()}; server step lr {self.server_lr:g}, beta1 {self.beta1:g}, "
                f"beta2 {self.beta2:g}, tau {self.tau:g}")


class FedYogi(FedAdam):
    """As FedAdam, but v moves towards Δ² by a fixed step: v ← v − (1−β2)·Δ²·sign(v − Δ²)."""

    name = "fedyogi"

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        squared = delta**2
        return v - (1 - self.beta2) * squared * np.sign(v - squared)


def of(aggregation: Aggregation) -> Strategy:
    """The strategy `aggregation.strategy` names, with `aggregation.weighting`."""
    chosen = aggregation.strategy
    if chosen.name == "fedavg":
        return FedAvg(aggregation.weighting)
    optimizer = FedAdam if chosen.name == "fedadam" else FedYogi
    return optimizer(aggregation.weighting, **chosen.optimizer())
