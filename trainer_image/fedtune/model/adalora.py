"""AdaLoRA across parties: every party allocates the same ranks, from the global adapter.

AdaLoRA (peft's ADALORA) writes each adapted matrix's update as P·Λ·Q (`lora_B`, `lora_E`,
`lora_A`) and prunes the least important singular triplets until a rank budget is met. On its
own, peft scores a triplet by its weights' sensitivity on the party's data (|w·∂L/∂w|,
smoothed) at every step; in a federation every party would then keep different triplets, and
the average would mix triplets that mean different things.

Here ranks are allocated at each aggregation point, from the global adapter every party holds
after the round, so every party computes the same pattern:

- a triplet's importance is the size of its rank-one part, |λ_i|·‖A_i‖·‖B_i‖, computed in
  float64 with numpy from the very bytes every party received (no party's data leaves it, and
  GPUs and CPUs decide alike);
- the budget follows peft's cubic schedule, read at the round's fraction f of training: the
  budget peft schedules at step f·total_step (`tinit`, `tfinal`, `total_step` as in
  AdaLoraConfig; `total_step` defaults to 100, making `tinit` and `tfinal` percentages);
- the pruned triplets' λ are set to zero and held there after every local step, as peft does
  with a rank pattern, so they are zero in every update and in the sum;
- the pattern is the adapter config's `rank_pattern`: a checkpoint holds the kept triplets and
  `PeftModel.from_pretrained` restores it.

What travels is what travels for LoRA: the trainable `lora_A`, `lora_E` and `lora_B` of every
adapted module.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

DEFAULT_TOTAL_STEP = 100
_E, _A, _B = "lora_E", "lora_A", "lora_B"


def adalora_options(options: dict[str, Any]) -> dict[str, Any]:
    """AdaLoraConfig's options with the schedule's length filled in (peft requires one)."""
    return {"total_step": DEFAULT_TOTAL_STEP, **options}


class RankBudget:
    """The rank pattern of one AdaLoRA model, allocated from each round's global adapter."""

    def __init__(self, model: Any, fractions: list[float]) -> None:
        self.model = model
        self.config = model.active_peft_config
        self.fractions = fractions
        params = dict(model.named_parameters())
        self.singular = {name: p for name, p in params.items() if f".{_E}." in name and p.requires_grad}
        self.init_budget = sum(p.shape[0] for p in self.singular.values())
        self.target_budget = self.config.target_r * len(self.singular)
        self.masks: dict[str, torch.Tensor] = {}

    @classmethod
    def of(cls, model: Any, fractions: list[float]) -> RankBudget | None:
        config = getattr(model, "active_peft_config", None)
        if str(getattr(config, "peft_type", "")).rpartition(".")[2] != "ADALORA":
            return None
        return cls(model, fractions)

    def budget(self, fraction: float) -> int | None:
        """How many triplets stay after the round at `fraction` of training; None: none pruned yet."""
        c = self.config
        step = fraction * c.total_step
        if step <= c.tinit:
            return None
        if step > c.total_step - c.tfinal:
            return self.target_budget
        remaining = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        return int((self.init_budget - self.target_budget) * remaining**3 + self.target_budget)

    def allocate(self, round_: int, adapter: dict[str, np.ndarray]) -> None:
        """Prune to round `round_`'s budget by the importance of the global adapter's triplets."""
        budget = self.budget(self.fractions[round_ - 1])
        if budget is None:
            return
        scores = {name: self._importance(name, adapter) for name in self.singular}
        drop = self.init_budget - budget
        everything = np.concatenate(list(scores.values()))
        threshold = np.partition(everything, drop - 1)[drop - 1] if drop > 0 else -np.inf
        self.masks = {name: torch.from_numpy(score > threshold) for name, score in scores.items()}
        # peft names the pattern's entries inside the wrapped model (as its own RankAllocator does).
        self.config.rank_pattern = {name.removeprefix("base_model.model."): mask.tolist()
                                    for name, mask in self.masks.items()}
        self.hold()

    def _importance(self, name: str, adapter: dict[str, np.ndarray]) -> np.ndarray:
        e = np.abs(adapter[name].astype(np.float64)).reshape(-1)
        a = np.linalg.norm(adapter[name.replace(f".{_E}.", f".{_A}.")].astype(np.float64), axis=1)
        b = np.linalg.norm(adapter[name.replace(f".{_E}.", f".{_B}.")].astype(np.float64), axis=0)
        return e * a * b

    def hold(self) -> None:
        """Keep the pruned λ at zero (after every optimizer step: training would revive them)."""
        with torch.no_grad():
            for name, mask in self.masks.items():
                param = self.singular[name]
                param.masked_fill_(~mask.to(param.device).view(param.shape), 0.0)
