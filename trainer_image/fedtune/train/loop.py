"""Local training with transformers' Trainer + peft, stopping at aggregation points.

`train` runs one party's local fine-tuning. At each step listed in `agg_steps` it calls
`on_round(index, step)` from the Trainer's `on_step_end`: the caller sends the adapter away and
loads the global one into the model in place (the optimizer keeps the same parameter tensors).
Right after, the Trainer saves a resumable state into `state_dir` (adapter, optimizer, scheduler,
RNG, trainer state: adapter-sized, never the base model), keeping only the latest. A `train`
that finds such a state resumes from it: rounds up to that step are not repeated, the data order
is the same as without the interruption. A party killed after `on_round(k)` returned but before
its state was saved redoes round k (`on_round(k)` is called again on restart).

Under torch.distributed (a party's ranks, `fedtune.train.ranks`) every rank calls `train` alike and
trains on its share of each batch; the plan counts the ranks, and rank 0 writes the saved state
(each rank adds its own RNG state).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from fedtune.files import fsync_files, replace_dir
from fedtune.model.adapters import adapter_state, load_adapter_state
from fedtune.model.loss import causal_lm_loss, supports_fused_loss
from fedtune.spec import MANAGED_TRAINER_KEYS
from fedtune.train.data import FeatureDataset, check_packing, collator_for

CHECKPOINT_PREFIX = "checkpoint-"  # Trainer's own folder naming, kept so its resume logic applies
ADAPTER_STATE_FILE = "adapter_state.safetensors"
STAGING = ".staging"  # Trainer writes a state here; it becomes visible by a rename when complete

OnRound = Callable[[int, int], None]
OnStep = Callable[[], None]
OnLog = Callable[[int, float], None]


@dataclass
class TrainResult:
    max_steps: int
    start_step: int  # global step this call began at: > 0 when it resumed a saved state
    losses: dict[int, float] = field(default_factory=dict)  # global step -> training loss
    rounds: list[int] = field(default_factory=list)  # round indices on_round was called for in this call
    step_seconds: list[float] = field(default_factory=list)  # each optimizer step: forward, backward, update

    @property
    def mean_step_seconds(self) -> float:
        return sum(self.step_seconds) / len(self.step_seconds) if self.step_seconds else 0.0


# --- planning -----------------------------------------------------------------------------


def world_size() -> int:
    """The party's ranks training together (`fedtune.train.ranks`): 1 outside torch.distributed."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _on_cpu(trainer_args: dict[str, Any]) -> bool:
    return bool(trainer_args.get("no_cuda") or trainer_args.get("use_cpu")) or not torch.cuda.is_available()


def _data_parallel(trainer_args: dict[str, Any], ranks: int) -> int:
    """How many batches one optimizer step takes in: one per rank; a single process on GPUs is
    data-parallel over all it sees (Trainer wraps it in DataParallel)."""
    if ranks > 1 or _on_cpu(trainer_args):
        return ranks
    return max(torch.cuda.device_count(), 1)


def plan_max_steps(n_samples: int, trainer_args: dict[str, Any], ranks: int = 1) -> int:
    """The optimizer steps Trainer will take over `ranks` data-parallel processes: `max_steps` if set,
    else epochs x updates per epoch (each update: per-device batch x ranks x accumulation samples)."""
    if n_samples < 1:
        raise ValueError("no training samples: nothing to plan")
    if int(trainer_args.get("max_steps", -1)) > 0:
        return int(trainer_args["max_steps"])
    batch = int(trainer_args.get("per_device_train_batch_size", 8)) * _data_parallel(trainer_args, ranks)
    batches = n_samples // batch if trainer_args.get("dataloader_drop_last") else math.ceil(n_samples / batch)
    if batches < 1:
        raise ValueError(f"{n_samples} samples make no full batch of {batch} with dataloader_drop_last")
    accumulation = int(trainer_args.get("gradient_accumulation_steps", 1))
    per_epoch = max(math.ceil(batches / accumulation), 1)
    return math.ceil(float(trainer_args.get("num_train_epochs", 3.0)) * per_epoch)


# Trainer keys that are no TrainingArguments field of transformers 5: the reference's `no_cuda` and
# `save_strategy`, transformers 4's `group_by_length`; `training_arguments` translates or sets them.
TRANSLATED_TRAINER_KEYS = ("no_cuda", "save_strategy", "group_by_length")


def check_trainer_keys(trainer_args: dict[str, Any]) -> None:
    """Every trainer key is a TrainingArguments field (or one fedtune translates), none is fedtune's own."""
    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    for key in trainer_args:
        if key in MANAGED_TRAINER_KEYS:
            raise ValueError(f"trainer.{key}: managed by fedtune (checkpoints follow aggregation.agg_steps)")
        if key not in known and key not in TRANSLATED_TRAINER_KEYS:
            raise ValueError(f"trainer.{key}: not an option of transformers' TrainingArguments")


def training_arguments(trainer_args: dict[str, Any], max_steps: int, state_dir: Path) -> TrainingArguments:
    """The spec's trainer keys as TrainingArguments, with what fedtune manages fixed."""
    check_trainer_keys(trainer_args)
    args = dict(trainer_args)
    if args.pop("no_cuda", False) or (world_size() > 1 and _on_cpu(args)):
        args["use_cpu"] = True  # transformers 5 spells the reference's `no_cuda` this way; gloo ranks need it
    if args.pop("group_by_length", False):
        args["train_sampling_strategy"] = "group_by_length"  # and transformers 4's `group_by_length` this way
    args.pop("save_strategy", None)  # saving follows the aggregation points, not a strategy
    args.setdefault("ddp_find_unused_parameters", False)  # every adapter weight gets a gradient at every step
    args.setdefault("report_to", "none")  # tensorboard, mlflow, ...: opted into with trainer.report_to
    args.update(
        output_dir=str(state_dir),
        max_steps=max_steps,  # the planned count, so Trainer and the aggregation points agree
        save_strategy="no",  # the round callback asks for each save
        logging_strategy="steps",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    try:
        return TrainingArguments(**args)
    except (TypeError, ValueError) as err:
        raise ValueError(f"trainer: {err}") from None


# --- resumable state ----------------------------------------------------------------------


def _step_of(path: Path) -> int:
    suffix = path.name[len(CHECKPOINT_PREFIX):]
    return int(suffix) if suffix.isdigit() else -1


def latest_state(state_dir: Path) -> Path | None:
    """The newest saved state (folders appear by rename, so any that exists is complete)."""
    if not state_dir.is_dir():
        return None
    states = [p for p in state_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and _step_of(p) >= 0]
    return max(states, key=_step_of, default=None)


def _check_state(state: Path, max_steps: int) -> None:
    try:
        saved = json.loads((state / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{state}: unreadable training state ({err}); remove it to start over") from None
    if saved.get("max_steps") != max_steps:
        raise ValueError(f"{state}: saved training state is for {saved.get('max_steps')} steps but this run plans "
                         f"{max_steps} (different data or trainer settings?); remove {state.parent} to start over")


class _FederatedTrainer(Trainer):
    """Trainer whose checkpoints hold only the adapter and appear atomically, one at a time.

    With several ranks, rank 0 writes the checkpoint and each rank its own RNG state into the
    same staging folder; rank 0 renames it once all have written."""

    def __init__(self, *args: Any, state_dir: Path, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.state_dir = state_dir

    def _get_output_dir(self, trial: Any) -> str:
        return str(self.state_dir / STAGING)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        staging = self.state_dir / STAGING
        lead = self.args.should_save
        if lead:
            shutil.rmtree(staging, ignore_errors=True)  # leftovers of a save that was killed
        self.accelerator.wait_for_everyone()
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()
        if lead:
            written = staging / f"{CHECKPOINT_PREFIX}{self.state.global_step}"
            fsync_files(written)
            final = self.state_dir / written.name
            replace_dir(written, final)
            for old in self.state_dir.glob(f"{CHECKPOINT_PREFIX}*"):
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()  # no rank moves on while the state is being renamed

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Only the adapter: the base model is read-only input and the tokenizer never changes.
        if not self.args.should_save:
            return
        out = Path(output_dir or self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file(adapter_state(self.model), str(out / ADAPTER_STATE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        state = load_file(str(Path(resume_from_checkpoint) / ADAPTER_STATE_FILE))
        load_adapter_state(model if model is not None else self.model, state)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """The same loss as Trainer's, from the answer positions only (`fedtune.model.loss`)."""
        unwrapped = self.accelerator.unwrap_model(model)
        if (return_outputs or "labels" not in inputs or self.label_smoother is not None
                or self.compute_loss_func is not None or not supports_fused_loss(unwrapped)):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        loss = causal_lm_loss(model, inputs, num_items_in_batch if scaled else None, unwrapped=unwrapped)
        if scaled and self.args.average_tokens_across_devices:  # as Trainer does for token-averaged losses
            loss = loss * (self.args.n_gpu if self.args.n_gpu > 1 else self.accelerator.num_processes)
        return loss


# --- evaluation ---------------------------------------------------------------------------


def evaluate(model: Any, tokenizer: Any, features: Sequence[dict[str, list[int]]], batch_size: int = 8) -> float:
    """The model's loss on `features`: the mean over every answer token (as training's loss counts them)."""
    collate = collator_for(tokenizer)
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(features), batch_size):
                batch = {k: v.to(device) for k, v in collate(features[start:start + batch_size]).items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                labels = batch["labels"][:, 1:]
                logits = logits[:, logits.shape[1] - batch["labels"].shape[1]:][:, :-1]  # prompt-learning tokens first
                losses = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, reduction="sum",
                                                           ignore_index=-100)
                total += float(losses)
                tokens += int((labels != -100).sum())
    finally:
        model.train(was_training)
    return total / max(tokens, 1)


# --- the rounds ---------------------------------------------------------------------------


class _RoundCallback(TrainerCallback):
    def __init__(self, agg_steps: Sequence[int], on_round: OnRound, on_log: OnLog | None, result: TrainResult,
                 on_step: OnStep | None = None) -> None:
        self.agg_steps = list(agg_steps)
        self.on_round = on_round
        self.on_step = on_step
        self.on_log_fn = on_log
        self.result = result
        self.next_round = 0
        self.step_started = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # After a resume `state.global_step` is the saved step: its rounds are done already.
        self.next_round = sum(1 for step in self.agg_steps if step <= state.global_step)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step_started = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.result.step_seconds.append(time.perf_counter() - self.step_started)
        if self.on_step is not None:
            self.on_step()
        while self.next_round < len(self.agg_steps) and self.agg_steps[self.next_round] <= state.global_step:
            self.on_round(self.next_round, state.global_step)
            self.result.rounds.append(self.next_round)
            self.next_round += 1
            control.should_save = True  # Trainer saves right after this callback returns
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.result.losses[state.global_step] = float(logs["loss"])
            if self.on_log_fn is not None:
                self.on_log_fn(state.global_step, float(logs["loss"]))


def _check_agg_steps(agg_steps: Sequence[int], max_steps: int) -> None:
    previous = 0
    for step in agg_steps:
        if not previous < step <= max_steps:
            raise ValueError(f"aggregation steps {list(agg_steps)} must rise strictly within 1..{max_steps}")
        previous = step


def train(
    model: Any,
    tokenizer: Any,
    features: Sequence[dict[str, list[int]]],
    trainer_args: dict[str, Any],
    *,
    agg_steps: Sequence[int],
    on_round: OnRound,
    on_log: OnLog | None = None,
    on_step: OnStep | None = None,
    state_dir: Path,
    packing: bool = False,
) -> TrainResult:
    """Train `model` (a peft model) on `features`, calling `on_round` at each aggregation step (and
    `on_step` after every optimizer step, before that).

    Under torch.distributed (a party's ranks), every rank calls it with the same features and the
    same `on_round`; each trains on its share of every batch. `packing`: each batch as one row
    without padding (`dataset.packing`), refused for a model whose attention cannot keep the
    samples apart.
    """
    if packing:
        check_packing(model)
    max_steps = plan_max_steps(len(features), trainer_args, world_size())
    _check_agg_steps(agg_steps, max_steps)
    state_dir = Path(state_dir)
    resume = latest_state(state_dir)
    if resume is not None:
        _check_state(resume, max_steps)
    result = TrainResult(max_steps=max_steps, start_step=_step_of(resume) if resume else 0)
    trainer = _FederatedTrainer(
        model=model,
        args=training_arguments(trainer_args, max_steps, state_dir),
        train_dataset=FeatureDataset(features),
        data_collator=collator_for(tokenizer, packing=packing),
        callbacks=[_RoundCallback(agg_steps, on_round, on_log, result, on_step)],
        state_dir=state_dir,
    )
    trainer.remove_callback(PrinterCallback)  # progress goes through on_log, not stdout
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        if trainer.args.should_save:
            shutil.rmtree(state_dir / STAGING, ignore_errors=True)
    return result
