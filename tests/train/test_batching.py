"""Batches without waste: packed rows train exactly like padded batches; models that cannot pack are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedtune.model.adapters import apply_adapter, native_prefix_overrides
from fedtune.model.base import load_base_model
from fedtune.model.loss import causal_lm_loss
from fedtune.spec import Dataset, Peft, TrainsetEntry
from fedtune.train.data import DataError, PackedCollator, check_packing, collator_for, load_qa, tokenize_qa
from fedtune.train.loop import train, training_arguments
from support.jobs import POEMS

DATASET = Dataset(max_src_length=24, max_dst_length=48)  # part-2's answers differ in length
LORA = {"LORA": {"r": 4, "lora_dropout": 0.0}}
TOLERANCE = 1e-5


def adapted(folder: Path, peft: dict):
    spec = Peft.model_validate(peft)
    model, tokenizer = load_base_model(folder, config_overrides=native_prefix_overrides(folder, spec))
    torch.manual_seed(0)
    model, _ = apply_adapter(model, spec)
    with torch.no_grad():  # non-zero LoRA B, so every adapter weight has a gradient to compare
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    model.config.use_cache = False  # as training runs it
    return model, tokenizer


def samples(tokenizer, n: int = 5) -> list[dict[str, list[int]]]:
    return tokenize_qa(load_qa([TrainsetEntry(path="part-2.json")], POEMS, DATASET)[:n], tokenizer, DATASET)


def test_packed_row_holds_the_samples_with_restarting_positions() -> None:
    batch = PackedCollator()([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
                              {"input_ids": [4, 5], "labels": [4, 5]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5]]  # no sample predicts the next one's start
    assert "attention_mask" not in batch


@pytest.mark.parametrize("loss", ["transformers", "fedtune"])
def test_packed_batch_has_the_padded_batch_loss_and_gradients(tiny_model: Path, loss: str) -> None:
    model, tokenizer = adapted(tiny_model, LORA)
    features = samples(tokenizer)
    padded, packed = collator_for(tokenizer)(features), collator_for(tokenizer, packing=True)(features)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()  # the padding is gone

    def run(batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad()
        value = model(**batch).loss if loss == "transformers" else causal_lm_loss(model, batch)
        value.backward()
        return value.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    (padded_loss, padded_grads), (packed_loss, packed_grads) = run(padded), run(packed)
    assert abs(packed_loss - padded_loss) <= TOLERANCE
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=TOLERANCE, rtol=TOLERANCE, msg=name)


def test_packed_training_logs_the_losses_of_padded_training(tmp_path: Path, tiny_model: Path) -> None:
    args = {"per_device_train_batch_size": 4, "learning_rate": 1e-2, "num_train_epochs": 1, "use_cpu": True,
            "seed": 5}
    runs = []
    for packing in (False, True):
        model, tokenizer = adapted(tiny_model, LORA)
        model.config.use_cache = True  # Trainer turns it off: packed masks need that
        result = train(model, tokenizer, samples(tokenizer, 8), args, agg_steps=[2], on_round=lambda i, s: None,
                       state_dir=tmp_path / str(packing), packing=packing)
        runs.append(result.losses)
    assert sorted(runs[0]) == sorted(runs[1]) == [1, 2]
    for step, value in runs[0].items():
        assert abs(runs[1][step] - value) <= TOLERANCE


@pytest.mark.parametrize(("checkpoint", "peft"), [
    ("tiny_model", {"PREFIX_TUNING": {"pre_seq_len": 4}}),  # peft's prefix cache switches packed masks off
    ("remote_chatglm", {"PREFIX_TUNING": {"pre_seq_len": 4}}),  # its own attention code (and prefix encoder)
])
def test_packing_is_refused_for_attention_that_cannot_keep_samples_apart(request, checkpoint: str, peft: dict,
                                                                         tmp_path: Path) -> None:
    model, tokenizer = adapted(request.getfixturevalue(checkpoint), peft)
    with pytest.raises(DataError, match=r"^dataset\.packing: .*does not keep the samples of a packed row apart"):
        check_packing(model)
    with pytest.raises(DataError, match=r"^dataset\.packing"):
        train(model, tokenizer, samples(tokenizer), {"use_cpu": True}, agg_steps=[1], on_round=lambda i, s: None,
              state_dir=tmp_path / "state", packing=True)


def test_packing_is_accepted_for_lora_on_a_native_glm(tiny_model: Path) -> None:
    model, _ = adapted(tiny_model, LORA)
    model.train()
    check_packing(model)
    assert model.training  # the probe leaves the mode as it found it


def test_group_by_length_of_transformers_4_means_length_grouped_sampling(tmp_path: Path) -> None:
    args = training_arguments({"group_by_length": True, "use_cpu": True}, 4, tmp_path)
    assert args.train_sampling_strategy == "group_by_length"
    assert training_arguments({"use_cpu": True}, 4, tmp_path).train_sampling_strategy == "random"
