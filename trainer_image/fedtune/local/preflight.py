"""Checks that a job can start, made before any process does (`fedtune validate`, `fedtune run`).

In the order of their cost, so that the usual mistakes fail within a second. `check_files` reads
files only: the model folders and the datasets (files exist, parse, have the keys and at least
one instance). `check_training` needs the training stack (importing it takes seconds and
hundreds of MB): the trainer and peft keys against transformers' TrainingArguments and peft's
config, that a party's ranks fit its devices, then whether `aggregation.agg_steps` gives every
party distinct rounds for its own step count. `fedtune validate` makes both here; `fedtune run`
makes the first in the launcher and the second in its fork server, which imports that stack
anyway, so that the launcher, alive for the whole job, never holds it. Each error names the job
file and the field, and the data file and instance where there is one. Nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedtune.model.folders import (
    ModelError,
    check_chatglm6b_prefix,
    check_folder,
    check_readable,
    is_chatglm6b,
    read_config,
)
from fedtune.spec import (
    FederatedFineTune,
    JobSpec,
    Party,
    SpecError,
    TrainsetEntry,
    aggregation_steps,
    resolve_path,
)
from fedtune.train.data import DataError, dataset_files, load_file

# What a model folder's weights are called: safetensors or torch files, possibly sharded with an index.
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "*.bin.index.json")


@dataclass(frozen=True)
class PartyPlan:
    """What one local party will do: its sample count, optimizer steps and the steps it aggregates at."""

    name: str
    samples: int
    max_steps: int = 0
    agg_steps: tuple[int, ...] = ()


def check_job(job: FederatedFineTune, base_dir: Path, source: str) -> dict[str, PartyPlan]:
    """Every local party's plan; a SpecError naming `source` and the field when the job cannot run."""
    return check_training(job, check_files(job, base_dir, source), source)


def check_files(job: FederatedFineTune, base_dir: Path, source: str) -> dict[str, int]:
    """The checks that read files only (no torch): each local party's number of training samples."""
    spec = job.spec
    try:
        samples = {party.name: _check_party_files(spec, i, party, base_dir)
                   for i, party in enumerate(spec.parties) if party.remote is None}
        _check_adapter(spec, base_dir)
        return samples
    except ValueError as err:  # SpecError, DataError, ModelError: each names its field or file
        raise SpecError(f"{source}: {err}") from None


def check_training(job: FederatedFineTune, samples: dict[str, int], source: str) -> dict[str, PartyPlan]:
    """The checks that import transformers and peft, given `check_files`' sample counts: the plans."""
    spec = job.spec
    try:
        _check_keys(spec)
        _check_devices(spec)
        return {name: _plan(spec, spec.party(name), n) for name, n in samples.items()}
    except ValueError as err:
        raise SpecError(f"{source}: {err}") from None


def device_notes(spec: JobSpec) -> list[str]:
    """Where a party's settings say one thing and this machine another (needs torch): parties that may use
    CUDA (`no_cuda: false`) on a machine without it train on the CPU."""
    import torch

    if torch.cuda.is_available():
        return []
    cpu = [p.name for p in spec.parties
           if p.remote is None and spec.trainset(p) and not spec.trainer_args(p).get("no_cuda")]
    if not cpu:
        return []
    return [f"this machine has no CUDA device: {', '.join(cpu)} (trainer.no_cuda: false) train on the CPU"]


def _check_party_files(spec: JobSpec, index: int, party: Party, base_dir: Path) -> int:
    """The party's model folder, trainset and valset; its number of training samples."""
    owner = f"spec.parties[{index}]" if party.pretrained_model else "spec.input"
    check_model_folder(resolve_path(spec.pretrained_model(party), base_dir), f"{owner}.pretrained_model.path")
    if spec.valset(party):
        field = f"spec.parties[{index}].valset" if party.valset is not None else "spec.input.valset"
        count_instances(spec.valset(party), base_dir, field, spec)
    entries = spec.trainset(party)
    if not entries:
        return 0  # an assist_trainer that only aggregates
    field = f"spec.parties[{index}].trainset" if party.trainset is not None else "spec.input.trainset"
    return count_instances(entries, base_dir, field, spec)


def check_model_folder(folder: Path, field: str) -> None:
    """The folder exists, holds a format fedtune loads (a ChatGLM folder it can convert) and every weight shard."""
    try:
        check_readable(folder)
    except ModelError as err:
        raise SpecError(f"{field}: {err}") from None
    if not folder.is_dir():
        raise SpecError(f"{field}: model folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise SpecError(f"{field}: {folder} has no config.json: not a transformers model folder")
    try:
        # ChatGLM-6B without weights is built with random ones, as the reference builds its demo folder
        weightless = is_chatglm6b(read_config(folder))
        if not weightless and not any(next(folder.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
            raise SpecError(f"{field}: {folder} holds no model weights (*.safetensors or pytorch_model*.bin)")
        check_folder(folder)
    except ModelError as err:
        raise SpecError(f"{field}: {err}") from None


def count_instances(entries: list[TrainsetEntry], base_dir: Path, field: str, spec: JobSpec) -> int:
    """Instances in the QA files the entries name, every file read and checked whole."""
    files = dataset_files(entries, base_dir, field)
    total = 0
    for path in files:
        try:
            total += len(load_file(path, spec.dataset))
        except DataError as err:
            raise DataError(f"{field}: {err}") from None
    if total == 0:
        raise DataError(f"{field}: {', '.join(map(str, files))}: no instances to train on")
    return total


def _check_adapter(spec: JobSpec, base_dir: Path) -> None:
    if spec.input.adapter_model is not None:
        adapter = resolve_path(spec.input.adapter_model.path, base_dir)
        try:
            check_readable(adapter)
        except ModelError as err:
            raise SpecError(f"spec.input.adapter_model.path: {err}") from None
        if not adapter.is_dir():
            raise SpecError(f"spec.input.adapter_model.path: adapter folder {adapter} does not exist")
        prefix = spec.peft.PREFIX_TUNING
        if prefix is not None:
            try:  # a P-tuning checkpoint of the model's own encoder: its length and form must be the job's
                check_chatglm6b_prefix(adapter, prefix.pre_seq_len, prefix.prefix_projection)
            except ModelError as err:
                raise SpecError(f"spec.input.adapter_model.path: {err}") from None


def _check_keys(spec: JobSpec) -> None:
    """Trainer keys are TrainingArguments fields, peft keys fields of the peft config (heavy imports)."""
    from fedtune.model.adapters import check_peft_keys
    from fedtune.train.loop import check_trainer_keys

    try:
        check_trainer_keys(spec.trainer.model_dump(exclude_unset=True))
    except ValueError as err:
        raise SpecError(f"spec.{err}") from None
    try:
        check_peft_keys(spec.peft)
    except ValueError as err:
        raise SpecError(f"spec.{err}") from None


def _check_devices(spec: JobSpec) -> None:
    """A party's ranks fit its devices (CUDA's count needs torch: only for parties with several ranks)."""
    for party in spec.parties:
        if party.remote is None and spec.ranks(party) > 1:
            from fedtune.train.ranks import check_devices

            check_devices(spec, party)


def _plan(spec: JobSpec, party: Party, samples: int) -> PartyPlan:
    if samples == 0:
        return PartyPlan(party.name, 0)
    from fedtune.train.loop import plan_max_steps

    max_steps = plan_max_steps(samples, spec.trainer_args(party), spec.ranks(party))
    try:
        steps = aggregation_steps(spec.fractions(), max_steps)
    except SpecError as err:
        raise SpecError(f"party `{party.name}` ({samples} samples, {max_steps} steps): spec.{err}") from None
    return PartyPlan(party.name, samples, max_steps, tuple(steps))
