"""What a party trains on and how: `input`, `output`, `aggregation`, `trainer`, `dataset`, the model info."""

from __future__ import annotations

import string
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedtune.spec.common import PathRef, Strict

# Trainer keys each party may set for itself; every other key comes from the assist_trainer.
LOCAL_TRAINER_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps", "torch_compile", "no_cuda")


# Keys fedtune manages itself: a user value would break round alignment or checkpoint layout.
MANAGED_TRAINER_KEYS = (
    "output_dir", "save_steps", "save_total_limit", "logging_dir", "resume_from_checkpoint",
)


class PretrainedModel(PathRef):
    """The base model: a local folder (native GLM, or a ChatGLM2/3 / GLM-4 folder converted at load), how it is held."""

    # auto: bfloat16 on GPUs that support it, float16 on other GPUs, float32 on the CPU. Adapters always
    # train, travel and are aggregated in float32; the Trainer's mixed precision follows this dtype.
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # QLoRA: the base weights quantised to 4 or 8 bits by bitsandbytes (CUDA only).
    quantization: Literal["4bit", "8bit"] | None = None


class TrainsetEntry(Strict):
    type: Literal["QA"] = "QA"
    path: str = Field(min_length=1)


class Input(Strict):
    pretrained_model: PretrainedModel
    adapter_model: PathRef | None = None
    trainset: list[TrainsetEntry] = Field(default_factory=list)
    # Held-out QA data: each party evaluates every round's global adapter on its valset.
    valset: list[TrainsetEntry] = Field(default_factory=list)


class Output(Strict):
    # `[JOB_ID]` and `[NODE_ID]` become the job's and the party's name (the reference's placeholders).
    path: str = Field(min_length=1)


# A server optimizer's settings when the job names none: Reddi et al. 2021's FedYogi defaults (as Flower's).
SERVER_OPTIMIZER_DEFAULTS = {"server_lr": 1e-2, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}


class Strategy(Strict):
    """How a round's mean becomes the global adapter: `fedavg` takes it as it is; `fedadam` and `fedyogi` step a
    server-side adaptive optimizer along it (Reddi et al. 2021; `fedtune.federation.strategy`)."""

    name: Literal["fedavg", "fedadam", "fedyogi"] = "fedavg"
    # The server optimizer's (fedadam, fedyogi only): global += server_lr * m / (sqrt(v) + tau).
    server_lr: float | None = Field(None, gt=0)
    beta1: float | None = Field(None, ge=0, lt=1)
    beta2: float | None = Field(None, ge=0, lt=1)
    tau: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _optimizer_settings(self) -> Strategy:
        for key, default in SERVER_OPTIMIZER_DEFAULTS.items():
            if self.name == "fedavg" and getattr(self, key) is not None:
                raise ValueError(f"`{key}` is a server optimizer's setting (fedadam, fedyogi); fedavg has none")
            if self.name != "fedavg" and getattr(self, key) is None:
                setattr(self, key, default)
        return self

    def optimizer(self) -> dict[str, float]:
        """The server optimizer's settings, defaults filled in (empty for fedavg)."""
        values = {key: getattr(self, key) for key in SERVER_OPTIMIZER_DEFAULTS}
        return {} if self.name == "fedavg" else {k: float(v) for k, v in values.items()}


class Aggregation(Strict):
    agg_steps: float = Field(0.2, gt=0, le=1)
    # `samples`: FedAvg weighted by each party's training-sample count; `uniform`: the reference's mean.
    weighting: Literal["samples", "uniform"] = "samples"
    strategy: Strategy = Field(default_factory=Strategy)
    # A party that never arrives fails the round instead of blocking it forever.
    round_timeout_s: float = Field(1800.0, gt=0)


class Trainer(BaseModel):
    """A subset of transformers' TrainingArguments; other TrainingArguments keys pass through."""

    model_config = ConfigDict(extra="allow")
    per_device_train_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, ge=0)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1)
    # Accepted for compatibility: saving always follows `aggregation.agg_steps`.
    save_strategy: Literal["steps"] = "steps"
    torch_compile: bool = False
    no_cuda: bool = False
    seed: int = 42

    @model_validator(mode="after")
    def _no_managed_keys(self) -> Trainer:
        for key in MANAGED_TRAINER_KEYS:
            if key in (self.model_extra or {}):
                raise ValueError(f"`{key}` is managed by fedtune (checkpoints follow aggregation.agg_steps); remove it")
        if self.max_steps == 0:
            raise ValueError("`max_steps` must be positive, or -1 to train `num_train_epochs`")
        return self


class PartyTrainer(Strict):
    """What one party may set for itself; the rest is synchronised from the assist_trainer."""

    per_device_train_batch_size: int | None = Field(None, ge=1)
    gradient_accumulation_steps: int | None = Field(None, ge=1)
    torch_compile: bool | None = None
    no_cuda: bool | None = None


class Dataset(Strict):
    max_src_length: int = Field(100, ge=1)
    max_dst_length: int = Field(100, ge=1)
    prompt_pattern: str = "{}：\n问：{}\n答："
    key_query: str = Field("input", min_length=1)
    key_answer: str = Field("output", min_length=1)
    # Each batch as one row without padding, position ids restarting per sample (models whose
    # attention cannot keep the samples apart are refused at start).
    packing: bool = False

    @field_validator("prompt_pattern")
    @classmethod
    def _two_slots(cls, pattern: str) -> str:
        try:
            slots = [f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None]
        except ValueError as err:
            raise ValueError(f"not a format string: {err}") from None
        if len(slots) != 2 or any(slots):
            raise ValueError("needs exactly two `{}` slots: the instruction, then the query")
        return pattern


class ModelInfo(Strict):
    name: Literal["horizontal_chatglm"] = "horizontal_chatglm"
