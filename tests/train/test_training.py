"""Local training: planned steps, aggregation callbacks, the resumable state, and resuming after a kill."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedtune.model.adapters import adapter_state, apply_adapter, load_adapter_state
from fedtune.model.base import load_base_model
from fedtune.spec import Dataset, Peft, Trainer, TrainsetEntry, aggregation_steps
from fedtune.train.data import load_qa, tokenize_qa
from fedtune.train.loop import plan_max_steps, train
from support.jobs import POEMS
from support.threads import torch_threads

DATASET = Dataset(max_src_length=32, max_dst_length=16)
FRACTIONS = [0.25, 0.5, 0.75, 1.0]


class Killed(Exception):
    """Stands for the process dying inside a round."""


def trainer_args(**overrides) -> dict:
    values = {"per_device_train_batch_size": 4, "learning_rate": 2e-2, "num_train_epochs": 2, "no_cuda": True,
              "seed": 7} | overrides
    return Trainer.model_validate(values).model_dump()  # the spec's trainer dict, as roles pass it


def setup(model_dir: Path, peft: dict | None = None, n: int = 24):
    model, tokenizer = load_base_model(model_dir)
    torch.manual_seed(0)  # the same initial adapter in every run of a test
    peft_model, _ = apply_adapter(model, Peft.model_validate(peft or {"LORA": {"r": 4, "lora_dropout": 0.1}}))
    items = load_qa([TrainsetEntry(path="part-0.json")], POEMS, DATASET)[:n]
    return peft_model, tokenizer, tokenize_qa(items, tokenizer, DATASET)


def shrink_round(model):
    """A deterministic stand-in for 'send the adapter, load the global one': scale it in place."""

    def on_round(index: int, step: int) -> None:
        load_adapter_state(model, {k: v * 0.9 for k, v in adapter_state(model).items()})

    return on_round


@pytest.mark.parametrize(
    ("n", "overrides"),
    [
        (24, {}),
        (25, {"gradient_accumulation_steps": 3}),
        (10, {"num_train_epochs": 1.5, "per_device_train_batch_size": 3}),
        (10, {"max_steps": 7}),
        (10, {"dataloader_drop_last": True, "per_device_train_batch_size": 4, "num_train_epochs": 1}),
    ],
)
def test_plan_max_steps_is_what_trainer_does(tmp_path: Path, tiny_model: Path, n: int, overrides: dict) -> None:
    """Trainer left to itself (no max_steps from fedtune) takes exactly the planned number of steps."""
    from transformers import Trainer as HfTrainer
    from transformers import TrainingArguments

    from fedtune.train.data import FeatureDataset, collator_for

    model, tokenizer, features = setup(tiny_model, n=n)
    args = trainer_args(**overrides)
    hf_args = {k: v for k, v in args.items() if k not in ("no_cuda", "save_strategy", "torch_compile")}
    trainer = HfTrainer(model=model, train_dataset=FeatureDataset(features), data_collator=collator_for(tokenizer),
                        args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                               save_strategy="no", learning_rate=1e-9,
                                               **{k: v for k, v in hf_args.items() if k != "learning_rate"}))
    assert trainer.train().global_step == plan_max_steps(n, args)


def test_train_calls_rounds_at_planned_steps_and_lowers_the_loss(tmp_path: Path, tiny_model: Path) -> None:
    model, tokenizer, features = setup(tiny_model, n=8)
    args = trainer_args(num_train_epochs=8)
    max_steps = plan_max_steps(len(features), args)
    agg = aggregation_steps(FRACTIONS, max_steps)
    rounds, logged = [], []
    result = train(model, tokenizer, features, args, agg_steps=agg,
                   on_round=lambda i, s: rounds.append((i, s)), on_log=lambda s, loss: logged.append(s),
                   state_dir=tmp_path / "state")
    assert max_steps == 16 and agg == [4, 8, 12, 16]
    assert rounds == list(enumerate(agg)) and result.rounds == [0, 1, 2, 3]
    assert logged == list(range(1, max_steps + 1)) == sorted(result.losses)
    losses = [result.losses[s] for s in logged]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.05
    assert len(result.step_seconds) == max_steps and result.mean_step_seconds > 0

    # Training wrote only its resumable state: the latest one, adapter-sized, no model weights.
    assert [p.name for p in tmp_path.iterdir()] == ["state"]
    (state,) = (tmp_path / "state").iterdir()
    assert state.name == "checkpoint-16"
    assert sorted(p.name for p in state.iterdir()) == [
        "adapter_state.safetensors", "optimizer.pt", "rng_state.pth", "scheduler.pt", "trainer_state.json"]
    adapter_bytes = sum(v.numel() * 4 for v in adapter_state(model).values())
    assert sum(p.stat().st_size for p in state.iterdir()) < 3 * adapter_bytes + 64 * 1024


def test_round_hook_loads_into_the_parameters_the_optimizer_steps(tmp_path: Path, tiny_model: Path) -> None:
    model, tokenizer, features = setup(tiny_model, n=8)
    before: dict[int, dict[str, torch.Tensor]] = {}

    def on_round(index: int, step: int) -> None:
        before[index] = adapter_state(model)
        load_adapter_state(model, {k: torch.full_like(v, 0.01) for k, v in adapter_state(model).items()})

    train(model, tokenizer, features, trainer_args(num_train_epochs=2), agg_steps=[2, 4], on_round=on_round,
          state_dir=tmp_path / "state")
    # Loaded at step 2, then moved by the optimizer in steps 3 and 4: it steps the very tensors loaded into.
    assert all(not torch.allclose(v, torch.full_like(v, 0.01)) for v in before[1].values())
    assert all(torch.equal(v, torch.full_like(v, 0.01)) for v in adapter_state(model).values())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    """The reference run: 24 samples, batch 4, 2 epochs: 12 steps, rounds at 3, 6 (end of epoch 1), 9, 12."""
    args = trainer_args()
    with torch_threads(1):  # as the tests that compare with it, bit for bit
        model, tokenizer, features = setup(tiny_model)
        agg = aggregation_steps(FRACTIONS, plan_max_steps(len(features), args))
        result = train(model, tokenizer, features, args, agg_steps=agg, on_round=shrink_round(model),
                       state_dir=tmp_path_factory.mktemp("uninterrupted"))
    return agg, result, adapter_state(model)


@pytest.mark.parametrize("killed_in", [1, 2])  # round 2 resumes mid-epoch, round 3 at an epoch boundary
def test_killed_in_a_round_resumes_and_ends_like_an_uninterrupted_run(tmp_path: Path, tiny_model: Path,
                                                                       uninterrupted, killed_in: int) -> None:
    agg, whole, expected = uninterrupted
    args = trainer_args()
    first, tokenizer, features = setup(tiny_model)
    rounds: list[int] = []
    first_round = shrink_round(first)

    def dies(index: int, step: int) -> None:
        if index == killed_in:
            raise Killed
        rounds.append(index)
        first_round(index, step)

    with pytest.raises(Killed):
        train(first, tokenizer, features, args, agg_steps=agg, on_round=dies, state_dir=tmp_path / "party")
    saved_step = agg[killed_in - 1]
    assert rounds == list(range(killed_in))
    assert [p.name for p in (tmp_path / "party").iterdir()] == [f"checkpoint-{saved_step}"]

    restarted, tokenizer, features = setup(tiny_model)  # a new process: fresh model, same spec
    resumed_rounds: list[int] = []
    restart_round = shrink_round(restarted)

    def records(index: int, step: int) -> None:
        resumed_rounds.append(index)
        restart_round(index, step)

    resumed = train(restarted, tokenizer, features, args, agg_steps=agg, on_round=records,
                    state_dir=tmp_path / "party")
    remaining = list(range(killed_in, len(agg)))
    assert resumed.start_step == saved_step and resumed_rounds == remaining == resumed.rounds
    assert sorted(resumed.losses) == list(range(saved_step + 1, agg[-1] + 1))
    # Same data order, dropout masks (RNG state), optimizer and scheduler state: bitwise the same.
    assert {s: whole.losses[s] for s in resumed.losses} == resumed.losses
    final = adapter_state(restarted)
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_saved_state_of_another_plan_is_refused(tmp_path: Path, tiny_model: Path) -> None:
    model, tokenizer, features = setup(tiny_model, n=8)
    train(model, tokenizer, features, trainer_args(), agg_steps=[4], on_round=lambda i, s: None,
          state_dir=tmp_path / "state")
    with pytest.raises(ValueError, match=r"saved training state is for 4 steps but this run plans 8"):
        train(model, tokenizer, features, trainer_args(num_train_epochs=4), agg_steps=[8],
              on_round=lambda i, s: None, state_dir=tmp_path / "state")


def test_bad_trainer_keys_and_agg_steps_are_refused(tmp_path: Path, tiny_model: Path) -> None:
    model, tokenizer, features = setup(tiny_model, n=8)
    with pytest.raises(ValueError, match=r"trainer.warp_speed: not an option of transformers' TrainingArguments"):
        train(model, tokenizer, features, trainer_args(warp_speed=9), agg_steps=[4], on_round=lambda i, s: None,
              state_dir=tmp_path / "state")
    with pytest.raises(ValueError, match=r"must rise strictly within 1..4"):
        train(model, tokenizer, features, trainer_args(), agg_steps=[2, 2], on_round=lambda i, s: None,
              state_dir=tmp_path / "state")


def test_ptuning_trains_the_prefix_and_leaves_the_base_alone(tmp_path: Path, tiny_model: Path) -> None:
    model, tokenizer, features = setup(tiny_model, {"PREFIX_TUNING": {"pre_seq_len": 4}}, n=8)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    prefix_before = adapter_state(model)
    result = train(model, tokenizer, features, trainer_args(learning_rate=1e-2), agg_steps=[2, 4],
                   on_round=lambda i, s: None, state_dir=tmp_path / "state")
    assert result.rounds == [0, 1]
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if n in base_before)
    assert not torch.equal(adapter_state(model)["prompt_encoder.default.embedding.weight"],
                           prefix_before["prompt_encoder.default.embedding.weight"])
