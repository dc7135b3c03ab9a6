"""Half-precision bases with float32 adapters, the Trainer's matching mixed precision, activation checkpointing,
and the refusals of what a device cannot do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedtune.model import precision as precision_module
from fedtune.model.adapters import adapter_state, apply_adapter
from fedtune.model.base import load_base_model
from fedtune.model.precision import Precision, resolve_precision, with_mixed_precision
from fedtune.spec import Dataset, Peft, PretrainedModel, SpecError, Trainer, TrainsetEntry
from fedtune.train.data import load_qa, tokenize_qa
from fedtune.train.loop import train
from support.jobs import POEMS

LORA = {"LORA": {"r": 4, "lora_dropout": 0.0}}
PTUNING = {"PREFIX_TUNING": {"pre_seq_len": 4}}
DATASET = Dataset(max_src_length=24, max_dst_length=12)


def base(**fields) -> PretrainedModel:
    return PretrainedModel(path="model", **fields)


# --- what each device can do -----------------------------------------------------------------


def test_auto_is_float32_on_the_cpu_and_bfloat16_works_there() -> None:
    assert resolve_precision(base(), "cpu") == Precision(torch.float32)
    assert resolve_precision(base(dtype="bfloat16"), "cpu") == Precision(torch.bfloat16)


def test_float16_and_quantization_on_the_cpu_are_refused_naming_the_field() -> None:
    with pytest.raises(SpecError, match=r"^input\.pretrained_model\.dtype: float16 needs a GPU"):
        resolve_precision(base(dtype="float16"), "cpu")
    with pytest.raises(SpecError, match=r"^parties\[2\]\.pretrained_model\.quantization: 4bit .* need a CUDA device"):
        resolve_precision(base(quantization="4bit"), "cpu", "parties[2].pretrained_model")


def test_auto_on_a_gpu_follows_its_bfloat16_support(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU here: the capability query is replaced, the decision around it is what is tested."""
    monkeypatch.setattr(precision_module, "_gpu_name", lambda: "Tesla T4 (compute capability 7.5)")
    monkeypatch.setattr(precision_module, "_gpu_has_bfloat16", lambda: True)
    assert resolve_precision(base(), "cuda").dtype == torch.bfloat16
    monkeypatch.setattr(precision_module, "_gpu_has_bfloat16", lambda: False)
    assert resolve_precision(base(), "cuda").dtype == torch.float16
    with pytest.raises(SpecError, match=r"dtype: bfloat16 is not supported by Tesla T4 .*use float16 or auto"):
        resolve_precision(base(dtype="bfloat16"), "cuda")


def test_mixed_precision_follows_the_dtype_and_contradictions_are_refused() -> None:
    args = Trainer().model_dump()
    assert with_mixed_precision(args, Precision(torch.bfloat16), "input.pretrained_model") | {} == \
        args | {"bf16": True, "fp16": False}
    assert with_mixed_precision(args, Precision(torch.float32), "input.pretrained_model") == args
    mine = args | {"bf16": True}  # a float32 base with the user's own autocast is theirs to choose
    assert with_mixed_precision(mine, Precision(torch.float32), "input.pretrained_model") == mine
    with pytest.raises(SpecError, match=r"^trainer\.fp16: True contradicts input\.pretrained_model\.dtype.*bfloat16"):
        with_mixed_precision(args | {"fp16": True}, Precision(torch.bfloat16), "input.pretrained_model")
    with pytest.raises(SpecError, match=r"^trainer\.fp16: False contradicts"):
        with_mixed_precision(args | {"fp16": False}, Precision(torch.float16), "input.pretrained_model")


# --- a half-precision base -------------------------------------------------------------------


def features(tokenizer, n: int = 8) -> list[dict[str, list[int]]]:
    items = load_qa([TrainsetEntry(path="part-0.json")], POEMS, DATASET)[:n]
    return tokenize_qa(items, tokenizer, DATASET)


def trainer_args(**overrides) -> dict:
    values = {"per_device_train_batch_size": 4, "learning_rate": 1e-2, "max_steps": 2, "no_cuda": True,
              "seed": 7} | overrides
    return Trainer.model_validate(values).model_dump()


@pytest.mark.parametrize("peft", [LORA, PTUNING])
def test_bfloat16_base_trains_float32_adapters(tmp_path: Path, tiny_model: Path, peft: dict) -> None:
    bf16 = Precision(torch.bfloat16)
    model, tokenizer = load_base_model(tiny_model, precision=bf16)
    torch.manual_seed(0)
    peft_model, _ = apply_adapter(model, Peft.model_validate(peft))
    frozen = {p.dtype for p in peft_model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in peft_model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}
    before = adapter_state(peft_model)
    args = with_mixed_precision(trainer_args(), bf16, "input.pretrained_model")
    result = train(peft_model, tokenizer, features(tokenizer), args, agg_steps=[2], on_round=lambda i, s: None,
                   state_dir=tmp_path / "state")
    after = adapter_state(peft_model)
    assert all(v.dtype == torch.float32 for v in after.values())
    assert all(torch.isfinite(torch.tensor(loss)) for loss in result.losses.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    assert {p.dtype for p in peft_model.parameters() if p.requires_grad} == {torch.float32}


@pytest.mark.parametrize("peft", [LORA, PTUNING])
def test_activation_checkpointing_trains_the_same_adapter(tmp_path: Path, tiny_model: Path, peft: dict) -> None:
    """Checkpointed layers recompute their activations; the gradients, so the adapter, must not change."""
    results = []
    for checkpointing in (False, True):
        model, tokenizer = load_base_model(tiny_model)
        torch.manual_seed(0)
        peft_model, _ = apply_adapter(model, Peft.model_validate(peft))
        train(peft_model, tokenizer, features(tokenizer), trainer_args(gradient_checkpointing=checkpointing),
              agg_steps=[2], on_round=lambda i, s: None, state_dir=tmp_path / f"state-{checkpointing}")
        assert peft_model.get_base_model().is_gradient_checkpointing == checkpointing
        results.append(adapter_state(peft_model))
    plain, checkpointed = results
    initial = adapter_state(apply_adapter(load_base_model(tiny_model)[0], Peft.model_validate(peft))[0])
    assert any(not torch.allclose(plain[k], initial[k]) for k in plain)  # the adapter moved in both runs
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)
