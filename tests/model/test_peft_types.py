"""Every adapter type peft has for causal LMs, under `peft.<TYPE>`: built alike at every party, its trainable
tensors averaged, its checkpoints loadable; AdaLoRA's ranks allocated alike from the global adapter."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from fedtune.model.adalora import RankBudget
from fedtune.model.adapters import (
    ModelError,
    adapter_state,
    apply_adapter,
    check_peft_keys,
    load_adapter_state,
    save_checkpoint,
)
from fedtune.model.base import load_base_model
from fedtune.secagg import make_codec
from fedtune.spec import Peft, SpecError, parse_job
from support.jobs import EXAMPLE

# What each type is called in its trainable tensors' names.
TYPES = {
    "ADALORA": ({"init_r": 6, "target_r": 2, "target_modules": ["query_key_value"]}, ("lora_A", "lora_B", "lora_E")),
    "IA3": ({"target_modules": ["query_key_value", "dense_4h_to_h"], "feedforward_modules": ["dense_4h_to_h"]},
            ("ia3_l",)),
    "LOHA": ({"r": 4, "target_modules": ["query_key_value"]}, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")),
    "LOKR": ({"r": 4, "target_modules": ["query_key_value"]}, ("lokr_w1", "lokr_w2")),
    "OFT": ({"target_modules": ["query_key_value"]}, ("oft_R",)),
    "BOFT": ({"target_modules": ["query_key_value"], "boft_block_size": 4}, ("boft_R", "boft_s")),
}
PROMPT = "根据上句，写出下一句。：\n问：床前明月光\n答："


def build(model_dir: Path, kind: str, options: dict, seed: int = 7):
    transformers.set_seed(seed)  # as every party does before building its adapter
    model, tokenizer = load_base_model(model_dir)
    peft_model, note = apply_adapter(model, Peft.model_validate({kind: options}))
    return peft_model, tokenizer, note


def jittered(model, seed: int) -> dict[str, np.ndarray]:
    """The adapter after some `training`: its trainable tensors moved at random."""
    generator = torch.Generator().manual_seed(seed)
    return {k: (v + torch.randn(v.shape, generator=generator) * 0.05).numpy() for k, v in adapter_state(model).items()}


def frozen_adapter_parts(model) -> dict[str, torch.Tensor]:
    """The adapter's tensors that do not train (random projections, rank counters): never sent, so built alike."""
    return {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]
            if ".default" in n and not (isinstance(t, torch.nn.Parameter) and t.requires_grad)}


@pytest.mark.parametrize("kind", list(TYPES))
def test_each_type_is_built_alike_averaged_and_saved(tmp_path: Path, tiny_model: Path, kind: str) -> None:
    options, markers = TYPES[kind]
    model, tokenizer, note = build(tiny_model, kind, options)
    other, _, _ = build(tiny_model, kind, options)
    assert "query_key_value -> q_proj, k_proj, v_proj" in note
    state = adapter_state(model)
    assert state and all(any(m in name for m in markers) for name in state), list(state)
    assert all(any(m in name for name in state) for m in markers)
    assert adapter_state(other).keys() == state.keys()
    assert all(torch.equal(a, b) for a, b in zip(frozen_adapter_parts(model).values(),
                                                 frozen_adapter_parts(other).values()))

    # FedAvg, as the aggregator does it: the weighted sum of each party's trainable tensors.
    updates = {"a": jittered(model, 1), "b": jittered(model, 2)}
    codec = make_codec({"plain": {}})
    total = codec.combine({p: {k: (v * 0.5).astype(np.float32) for k, v in u.items()} for p, u in updates.items()}, {})
    load_adapter_state(other, {k: torch.from_numpy(v) for k, v in total.items()})
    for name, value in adapter_state(other).items():
        np.testing.assert_allclose(value.numpy(), (updates["a"][name] + updates["b"][name]) / 2, atol=1e-6)

    from peft import PeftModel

    saved = save_checkpoint(other, tmp_path / "checkpoint-1")
    assert json.loads((saved / "adapter_config.json").read_text())["peft_type"] == kind
    base, _ = load_base_model(tiny_model)
    loaded = PeftModel.from_pretrained(base, str(saved)).eval()
    other.eval()
    batch = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, other(**batch).logits)


def test_types_and_keys_are_checked_naming_the_field() -> None:
    with pytest.raises(ModelError, match=r"peft\.LOHA\.rank: not an option of peft's LoHaConfig"):
        check_peft_keys(Peft.model_validate({"LOHA": {"rank": 4}}))
    with pytest.raises(ModelError, match=r"peft\.LORAX: not an adapter type of peft \(it has .*LOKR"):
        check_peft_keys(Peft.model_validate({"LORAX": {}}))
    document = yaml_example()
    for peft, message in [({"lora": {}}, "`lora` is not a peft type"),
                          ({"LORA": {}, "IA3": {}}, "set exactly one adapter type"),
                          ({"VERA": {"task_type": "SEQ_CLS"}}, "CAUSAL_LM"),
                          ({"VERA": 4}, "`VERA`: expected the options of peft's VERA config")]:
        document["spec"]["peft"] = peft
        with pytest.raises(SpecError, match=r"spec\.peft") as info:
            parse_job(document, "job.yaml")
        assert message in str(info.value)
    document["spec"]["peft"] = {"VERA": {"r": 4}}
    assert parse_job(document).spec.peft.kind == "VERA"


def yaml_example() -> dict:
    import yaml

    return yaml.safe_load(EXAMPLE.read_text())


# --- AdaLoRA: the same ranks everywhere -------------------------------------------------------------


ADALORA = {"init_r": 6, "target_r": 2, "target_modules": ["query_key_value"], "tinit": 10, "tfinal": 20}


def test_adalora_budget_follows_peft_schedule_by_round(tiny_model: Path) -> None:
    model, _, _ = build(tiny_model, "ADALORA", ADALORA)
    budget = RankBudget.of(model, [0.25, 0.5, 0.75, 1.0])
    assert budget is not None and budget.init_budget == 6 * 6 and budget.target_budget == 2 * 6
    # total_step defaults to 100: tinit 10 and tfinal 20 are a tenth and a fifth of training.
    assert budget.budget(0.1) is None  # warm-up: nothing pruned
    assert budget.budget(0.25) == int(24 * (1 - 15 / 70) ** 3 + 12)
    assert budget.budget(0.8) == 12 and budget.budget(1.0) == 12  # final phase: the target
    assert RankBudget.of(build(tiny_model, "LOHA", TYPES["LOHA"][0])[0], [1.0]) is None


def test_adalora_parties_allocate_the_same_ranks_and_keep_them(tmp_path: Path, tiny_model: Path) -> None:
    """Two parties load the same global adapter: the same triplets stay, the others stay zero while they train."""
    parties = [build(tiny_model, "ADALORA", ADALORA, seed=s)[0] for s in (1, 2)]
    global_adapter = jittered(parties[0], 3)
    budgets = []
    for model in parties:
        load_adapter_state(model, {k: torch.from_numpy(v.copy()) for k, v in global_adapter.items()})
        budget = RankBudget.of(model, [0.5, 1.0])
        budget.allocate(2, {k: v.numpy() for k, v in adapter_state(model).items()})
        budgets.append(budget)
    patterns = [b.config.rank_pattern for b in budgets]
    assert patterns[0] == patterns[1]
    assert sum(sum(kept) for kept in patterns[0].values()) == budgets[0].target_budget
    model, budget = parties[0], budgets[0]
    with torch.no_grad():  # a local step revives every lambda...
        for param in budget.singular.values():
            param.add_(0.1)
    budget.hold()  # ...and the pattern holds
    for name, param in budget.singular.items():
        kept = torch.tensor(budget.config.rank_pattern[name.removeprefix("base_model.model.")])
        assert torch.all(param.view(-1)[~kept] == 0) and torch.all(param.view(-1)[kept] != 0)

    from peft import PeftModel

    saved = save_checkpoint(model, tmp_path / "checkpoint-1")
    base, tokenizer = load_base_model(tiny_model)
    loaded = PeftModel.from_pretrained(base, str(saved)).eval()
    assert {p.shape[0] for n, p in loaded.named_parameters() if "lora_E" in n} <= set(range(0, 7))
    assert sum(p.shape[0] for n, p in loaded.named_parameters() if "lora_E" in n) == budget.target_budget
    model.eval()
    batch = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


# --- the others: each builds and trains, or says why not -----------------------------------------


def test_every_peft_type_builds_and_trains_or_says_why(tiny_model: Path) -> None:
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING

    base, tokenizer = load_base_model(tiny_model)
    batch = tokenizer(PROMPT, return_tensors="pt")
    trained = []
    for kind in sorted(str(getattr(k, "value", k)) for k in PEFT_TYPE_TO_CONFIG_MAPPING):
        options = TYPES[kind][0] if kind in TYPES else {} if kind == "PREFIX_TUNING" else {
            "target_modules": ["query_key_value"]}
        try:
            model, _ = apply_adapter(copy.deepcopy(base), Peft.model_validate({kind: options}))
        except ModelError as err:
            assert str(err).startswith(f"peft.{kind}"), err
            continue
        assert adapter_state(model), kind
        try:  # some types need inputs of their own (token ids, task ids): peft says so at the forward pass
            loss = model(**batch, labels=batch["input_ids"]).loss
            loss.backward()
        except Exception:  # recorded as not trained; the required ones are checked below
            continue
        assert torch.isfinite(loss) and any(p.grad is not None for p in model.parameters() if p.requires_grad), kind
        trained.append(kind)
    assert set(TYPES) | {"LORA", "PREFIX_TUNING"} <= set(trained), trained
