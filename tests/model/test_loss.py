"""The answer-positions-only, chunked cross-entropy equals the plain causal-LM loss, and its adapter gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedtune.model import loss as loss_module
from fedtune.model.adapters import apply_adapter, native_prefix_overrides
from fedtune.model.base import load_base_model
from fedtune.model.loss import ChunkedLinearCrossEntropy, causal_lm_loss, supports_fused_loss
from fedtune.spec import Dataset, Peft, TrainsetEntry
from fedtune.train.data import collator_for, load_qa, tokenize_qa
from fedtune.train.loop import train
from support.jobs import POEMS

DATASET = Dataset(max_src_length=24, max_dst_length=12)
TOLERANCE = 1e-5


def features(tokenizer, n: int = 6) -> list[dict[str, list[int]]]:
    items = load_qa([TrainsetEntry(path="part-2.json")], POEMS, DATASET)[:n]  # answers of unequal length
    return tokenize_qa(items, tokenizer, DATASET)


def adapted(folder: Path, peft: dict) -> tuple:
    spec = Peft.model_validate(peft)
    model, tokenizer = load_base_model(folder, config_overrides=native_prefix_overrides(folder, spec))
    torch.manual_seed(0)
    model, _ = apply_adapter(model, spec)
    with torch.no_grad():  # LoRA's B starts at zero, which would leave A's gradient zero: make both count
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    return model, tokenizer


def loss_and_grads(model, compute) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    value = compute()
    value.backward()
    return value.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_close(plain: tuple, fused: tuple) -> None:
    assert abs(plain[0] - fused[0]) <= TOLERANCE, (plain[0], fused[0])
    assert plain[1].keys() == fused[1].keys() and plain[1]
    for name, grad in plain[1].items():
        assert grad.abs().max() > 0, f"{name}: no gradient at all, nothing compared"
        torch.testing.assert_close(fused[1][name], grad, atol=TOLERANCE, rtol=TOLERANCE, msg=name)


LORA = {"LORA": {"r": 4, "lora_dropout": 0.0}}
PREFIX = {"PREFIX_TUNING": {"pre_seq_len": 4}}


@pytest.mark.parametrize("peft", [LORA, PREFIX], ids=["lora", "ptuning"])
@pytest.mark.parametrize("checkpoint", ["tiny_model", "remote_chatglm"])
def test_equals_the_plain_loss_and_gradients(request, checkpoint: str, peft: dict, monkeypatch) -> None:
    folder = request.getfixturevalue(checkpoint)
    if checkpoint == "remote_chatglm" and "LORA" in peft:
        peft = {"LORA": {**peft["LORA"], "target_modules": ["query_key_value"]}}
    model, tokenizer = adapted(folder, peft)
    batch = collator_for(tokenizer)(features(tokenizer))
    assert supports_fused_loss(model)
    monkeypatch.setattr(loss_module, "CHUNK_BYTES", 3 * 4 * model.config.vocab_size)  # chunks of a few rows

    head_calls = []
    plain = loss_and_grads(model, lambda: model(**batch).loss)
    hook = loss_module._output_projection(model)[2].register_forward_hook(lambda *a: head_calls.append(1))
    fused = loss_and_grads(model, lambda: causal_lm_loss(model, batch))
    hook.remove()
    assert head_calls == []  # the full-vocabulary projection never ran
    assert_close(plain, fused)

    # Under gradient accumulation transformers sums and divides by the tokens of all micro-batches.
    total = torch.tensor(100)
    plain_sum = loss_and_grads(model, lambda: model(**batch, num_items_in_batch=total).loss) \
        if checkpoint == "tiny_model" else None
    if plain_sum is not None:
        assert_close(plain_sum, loss_and_grads(model, lambda: causal_lm_loss(model, batch, total)))


def test_chunked_cross_entropy_at_chatglm_vocabulary_size() -> None:
    """130,528 classes, a row whose target is all but impossible (p underflows), gradients by autograd."""
    torch.manual_seed(0)
    vocab, width = 130_528, 16
    weight = torch.randn(vocab, width) * 0.5
    hidden = torch.randn(9, width, requires_grad=True)
    targets = torch.randint(0, vocab, (9,))
    with torch.no_grad():
        hidden[0] = weight[7] * 100  # the 7th class dominates row 0 ...
        targets[0] = int((weight @ weight[7]).argmin())  # ... and the target is the least likely one
    reference = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum") / 11
    (expected,) = torch.autograd.grad(reference, hidden)
    chunked = ChunkedLinearCrossEntropy.apply(hidden, weight, None, targets, 1 / 11)
    (got,) = torch.autograd.grad(chunked * 1.0, hidden)
    row_zero = torch.nn.functional.cross_entropy((hidden[:1] @ weight.T), targets[:1])
    assert row_zero.item() > 104  # exp(-104) is below float32's smallest: p of that target underflows to 0
    torch.testing.assert_close(chunked, reference, atol=TOLERANCE, rtol=TOLERANCE)
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=TOLERANCE)


def test_trainer_steps_match_the_plain_loss_under_accumulation(tmp_path: Path, tiny_model: Path, monkeypatch) -> None:
    """Whole training runs, fused versus transformers' own loss: the same logged losses and adapter."""
    args = {"per_device_train_batch_size": 3, "gradient_accumulation_steps": 2, "learning_rate": 1e-2,
            "num_train_epochs": 1, "use_cpu": True, "seed": 3}

    def run(fused: bool, folder: Path) -> tuple[dict[int, float], dict[str, torch.Tensor]]:
        monkeypatch.setattr("fedtune.train.loop.supports_fused_loss", supports_fused_loss if fused else lambda m: False)
        model, tokenizer = adapted(tiny_model, LORA)
        result = train(model, tokenizer, features(tokenizer, n=12), args, agg_steps=[2],
                       on_round=lambda i, s: None, state_dir=folder)
        return result.losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    plain_losses, plain_adapter = run(False, tmp_path / "plain")
    fused_losses, fused_adapter = run(True, tmp_path / "fused")
    assert sorted(plain_losses) == sorted(fused_losses) == [1, 2]
    for step, value in plain_losses.items():
        assert abs(fused_losses[step] - value) <= TOLERANCE
    for name, value in plain_adapter.items():
        torch.testing.assert_close(fused_adapter[name], value, atol=TOLERANCE, rtol=TOLERANCE, msg=name)


def test_a_trainable_output_layer_keeps_the_plain_loss(tiny_model: Path) -> None:
    model, _ = adapted(tiny_model, {"LORA": {"r": 4, "lora_dropout": 0.0, "modules_to_save": ["lm_head"]}})
    assert not supports_fused_loss(model)


def test_without_the_fused_kernel_the_chunked_path_is_said_once(monkeypatch, caplog) -> None:
    monkeypatch.setitem(__import__("sys").modules, "liger_kernel.transformers.fused_linear_cross_entropy", None)
    monkeypatch.setattr(loss_module, "_said", set())
    with caplog.at_level("INFO", logger="fedtune.model.loss"):
        assert loss_module._liger_loss() is None and loss_module._liger_loss() is None
    said = [r.getMessage() for r in caplog.records if "Liger-Kernel" in r.getMessage()]
    assert len(said) == 1 and "using the chunked cross-entropy" in said[0]
