"""The FederatedFineTune job spec: one schema for `fedtune run`, every role and the operator.

It carries the reference's `trainer_config` keys with their meaning (`input`, `output`,
`aggregation`, `encryption`, `peft`, `trainer`, `dataset`), the parties, and the
Kubernetes specifics. It imports no torch: the operator validates resources with it.
"""

from __future__ import annotations

import math
import re
import string
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

API_VERSION = "fedtune.io/v1alpha1"
KIND = "FederatedFineTune"

# Trainer keys each party may set for itself; every other key comes from the assist_trainer.
LOCAL_TRAINER_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps", "torch_compile", "no_cuda")
# Keys fedtune manages itself: a user value would break round alignment or checkpoint layout.
MANAGED_TRAINER_KEYS = (
    "output_dir", "save_steps", "save_total_limit", "logging_dir", "resume_from_checkpoint",
)


class SpecError(ValueError):
    """A job spec that cannot run; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PathRef(_Strict):
    path: str = Field(min_length=1)


class PretrainedModel(PathRef):
    """The base model: a local folder (native GLM, or a ChatGLM2/3 / GLM-4 folder converted at load), how it is held."""

    # auto: bfloat16 on GPUs that support it, float16 on other GPUs, float32 on the CPU. Adapters always
    # train, travel and are aggregated in float32; the Trainer's mixed precision follows this dtype.
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # QLoRA: the base weights quantised to 4 or 8 bits by bitsandbytes (CUDA only).
    quantization: Literal["4bit", "8bit"] | None = None


class TrainsetEntry(_Strict):
    type: Literal["QA"] = "QA"
    path: str = Field(min_length=1)


class Input(_Strict):
    pretrained_model: PretrainedModel
    adapter_model: PathRef | None = None
    trainset: list[TrainsetEntry] = Field(default_factory=list)
    # Held-out QA data: each party evaluates every round's global adapter on its valset.
    valset: list[TrainsetEntry] = Field(default_factory=list)


class Output(_Strict):
    # `[JOB_ID]` and `[NODE_ID]` become the job's and the party's name (the reference's placeholders).
    path: str = Field(min_length=1)


class Aggregation(_Strict):
    agg_steps: float = Field(0.2, gt=0, le=1)
    # `samples`: FedAvg weighted by each party's training-sample count; `uniform`: the reference's mean.
    weighting: Literal["samples", "uniform"] = "samples"
    # A party that never arrives fails the round instead of blocking it forever.
    round_timeout_s: float = Field(1800.0, gt=0)


class KeyExchange(_Strict):
    """X25519 by default; `curve: ffdhe` is the reference's RFC 7919 group of `key_bitlength` bits.

    Setting `key_bitlength` or `optimized` without `curve` means the finite-field group, as in
    the reference's configuration.
    """

    key_bitlength: Literal[2048, 3072, 4096, 6144, 8192] = 3072
    optimized: bool = True
    curve: Literal["x25519", "ffdhe"] | None = None

    @model_validator(mode="after")
    def _resolve_curve(self) -> KeyExchange:
        if self.curve is None:
            self.curve = "ffdhe" if {"key_bitlength", "optimized"} & self.model_fields_set else "x25519"
        return self


class Csprng(_Strict):
    """ChaCha20 by default; `hmac_drbg` (the reference's) when named, or when its `method` is set alone."""

    name: Literal["hmac_drbg", "chacha20"] | None = None
    method: Literal["sha256", "sha512"] = "sha512"

    @model_validator(mode="after")
    def _resolve_name(self) -> Csprng:
        if self.name is None:
            self.name = "hmac_drbg" if "method" in self.model_fields_set else "chacha20"
        return self


class Otp(_Strict):
    key_bitlength: Literal[64, 128] = 64
    data_type: Literal["torch.Tensor"] = "torch.Tensor"
    key_exchange: KeyExchange = Field(default_factory=KeyExchange)
    csprng: Csprng = Field(default_factory=Csprng)


class SecAggPlus(Otp):
    """Secure aggregation that survives label_trainers dropping out mid-round (`fedtune.secagg.plus`)."""

    # Shares it takes to remove a round's masks: at least a majority of the label_trainers (the default).
    threshold: int | None = Field(None, ge=1)
    # A label_trainer that has not uploaded a round and has given no sign of life for this long since
    # the round's first upload is dropped from it (`aggregation.round_timeout_s` drops every latecomer).
    dropout_timeout_s: float = Field(60.0, gt=0)


SCHEMES = ("plain", "otp", "secagg_plus")


def majority(count: int) -> int:
    """The smallest number of share holders that no two disjoint groups can both reach."""
    return count // 2 + 1


class Encryption(_Strict):
    plain: dict[str, Any] | None = None
    otp: Otp | None = None
    secagg_plus: SecAggPlus | None = None

    @model_validator(mode="after")
    def _one_scheme(self) -> Encryption:
        chosen = [name for name in SCHEMES if getattr(self, name) is not None]
        if len(chosen) > 1:
            raise ValueError("set exactly one of `plain`, `otp` or `secagg_plus`")
        if not chosen:
            self.plain = {}
        return self

    @property
    def scheme(self) -> Literal["plain", "otp", "secagg_plus"]:
        return next(name for name in SCHEMES if getattr(self, name) is not None)  # type: ignore[return-value]

    @property
    def masking(self) -> Otp | None:
        """The settings of the masking scheme (`otp` or `secagg_plus`), None for `plain`."""
        return self.otp or self.secagg_plus


class Dp(_Strict):
    """Differential privacy of the global adapter (`fedtune.privacy`)."""

    # C: each party's update of a round is clipped to this L2 norm (over all its tensors).
    clip_norm: float = Field(gt=0)
    # σ: the aggregate carries Gaussian noise of σ times its sensitivity (σ·C with equal weights).
    noise_multiplier: float = Field(ge=0)
    # ε is reported for this δ.
    delta: float = Field(1e-5, gt=0, lt=1)


class Privacy(_Strict):
    dp: Dp | None = None


class Lora(BaseModel):
    """peft's LoraConfig: the common keys are checked here, any other LoraConfig key passes through."""

    model_config = ConfigDict(extra="allow")
    task_type: Literal["CAUSAL_LM"] = "CAUSAL_LM"
    r: int = Field(8, ge=1)
    target_modules: list[str] | str = Field(default_factory=lambda: ["query_key_value"])
    lora_alpha: float = Field(32, gt=0)
    lora_dropout: float = Field(0.1, ge=0, lt=1)
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] | None = None


class PrefixTuning(_Strict):
    """P-tuning v2 as in ChatGLM-6B: `pre_seq_len` trainable prefix tokens in every layer."""

    task_type: Literal["CAUSAL_LM"] = "CAUSAL_LM"
    pre_seq_len: int = Field(20, ge=1)
    prefix_projection: bool = False
    prefix_hidden_size: int | None = Field(None, ge=1)


class AdapterOptions(BaseModel):
    """Any other peft type's config for a causal LM: its keys go to peft's config class for that type as
    they are (checked against it before any process starts)."""

    model_config = ConfigDict(extra="allow")
    task_type: Literal["CAUSAL_LM"] = "CAUSAL_LM"


_PEFT_TYPE = re.compile(r"^[A-Z][A-Z0-9_]*$")  # peft's names: LORA, IA3, LOHA, BOFT, ...


class Peft(BaseModel):
    """Exactly one adapter type, named as peft names it. LoRA and P-tuning v2 (the reference's) and
    the types below have a section of their own; any other type peft has for causal LMs is taken
    under its name the same way."""

    model_config = ConfigDict(extra="allow")
    LORA: Lora | None = None
    PREFIX_TUNING: PrefixTuning | None = None
    ADALORA: AdapterOptions | None = None
    IA3: AdapterOptions | None = None
    LOHA: AdapterOptions | None = None
    LOKR: AdapterOptions | None = None
    OFT: AdapterOptions | None = None
    BOFT: AdapterOptions | None = None

    @model_validator(mode="after")
    def _one_adapter(self) -> Peft:
        chosen = [name for name in type(self).model_fields if getattr(self, name) is not None]
        for name, options in (self.model_extra or {}).items():
            if not _PEFT_TYPE.match(name):
                raise ValueError(f"`{name}` is not a peft type (peft names them in capitals: LORA, IA3, ...)")
            if not isinstance(options, dict):
                raise ValueError(f"`{name}`: expected the options of peft's {name} config, a mapping")
            AdapterOptions.model_validate(options)
            chosen.append(name)
        if len(chosen) != 1:
            raise ValueError(f"set exactly one adapter type (LORA, PREFIX_TUNING or another of peft's); "
                             f"found {', '.join(chosen) or 'none'}")
        return self

    @property
    def kind(self) -> str:
        """The adapter type: `LORA`, `PREFIX_TUNING`, `ADALORA`, `IA3`, ..."""
        return next(name for name in [*type(self).model_fields, *(self.model_extra or {})]
                    if getattr(self, name, None) is not None)

    def options(self) -> dict[str, Any]:
        """The chosen type's keys as given (defaults filled in for LORA and PREFIX_TUNING)."""
        chosen = getattr(self, self.kind)
        return (chosen if isinstance(chosen, BaseModel) else AdapterOptions.model_validate(chosen)).model_dump()


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


class PartyTrainer(_Strict):
    """What one party may set for itself; the rest is synchronised from the assist_trainer."""

    per_device_train_batch_size: int | None = Field(None, ge=1)
    gradient_accumulation_steps: int | None = Field(None, ge=1)
    torch_compile: bool | None = None
    no_cuda: bool | None = None


class Dataset(_Strict):
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


class Resources(_Strict):
    cpu: str | None = None
    memory: str | None = None
    gpu: int = Field(0, ge=0)


class Volume(_Strict):
    """An existing PersistentVolumeClaim mounted into a pod (Kubernetes only)."""

    claimName: str = Field(min_length=1)
    mountPath: str = Field(pattern=r"^/")
    subPath: str | None = None
    readOnly: bool = False


# Fields typed by a Kubernetes API type: the CRD generator puts that type's own OpenAPI schema here.
KUBE_TYPE = "x-fedtune-kube-type"


def _kube_type(name: str) -> dict[str, str]:
    return {KUBE_TYPE: name}


class Scheduling(_Strict):
    """Where a job's pods may run and how the cluster treats them (Kubernetes only).

    `spec.scheduling` applies to every pod of the job; `parties[].scheduling` is laid over it
    for that party's pod: lists add up, maps merge (the party's keys win), single values are
    replaced, and the party's `podTemplate` is laid over the job's.
    """

    tolerations: list[dict[str, Any]] = Field(default_factory=list,
                                              json_schema_extra=_kube_type("io.k8s.api.core.v1.Toleration"))
    nodeSelector: dict[str, str] = Field(default_factory=dict)
    affinity: dict[str, Any] | None = Field(None, json_schema_extra=_kube_type("io.k8s.api.core.v1.Affinity"))
    priorityClassName: str | None = None
    schedulerName: str | None = None
    imagePullSecrets: list[dict[str, Any]] = Field(
        default_factory=list, json_schema_extra=_kube_type("io.k8s.api.core.v1.LocalObjectReference"))
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    # Anything else, as a partial pod template (`metadata`, `spec`) merged over the pod fedtune builds.
    podTemplate: dict[str, Any] | None = Field(None, json_schema_extra=_kube_type("PodTemplateOverlay"))


class RunPolicy(_Strict):
    """How long a job may run, how long it stays once finished, and whether it runs now (Kubernetes only).

    The one part of a spec that may change once applied (a queue such as Kueue sets `suspend`).
    """

    # Counted from when the job last started running (a suspension restarts the count); past it, the job fails.
    activeDeadlineSeconds: int | None = Field(None, ge=1)
    # This long after the job succeeded or failed, the resource (and with it every child) is deleted.
    ttlSecondsAfterFinished: int | None = Field(None, ge=0)
    # True: the job's pods are removed (Redis, the claims and the Secrets stay); false again: it goes on
    # from the last round.
    suspend: bool = False


class Remote(_Strict):
    """A party run by another organisation: only its address is known here."""

    address: str = Field(pattern=r"^[^\s:]+:\d+$")


_PARTY_NAME = r"^[A-Za-z0-9]([-_.A-Za-z0-9]{0,38}[A-Za-z0-9])?$"


class Party(_Strict):
    name: str = Field(pattern=_PARTY_NAME)
    role: Literal["assist_trainer", "label_trainer"]
    trainset: list[TrainsetEntry] | None = None
    valset: list[TrainsetEntry] | None = None
    pretrained_model: PretrainedModel | None = None
    trainer: PartyTrainer = Field(default_factory=PartyTrainer)
    resources: Resources = Field(default_factory=Resources)
    # Data-parallel training processes of this party (default: one per `resources.gpu`, at least one).
    ranks: int | None = Field(None, ge=1)
    volumes: list[Volume] = Field(default_factory=list)
    scheduling: Scheduling | None = None
    remote: Remote | None = None
    # host:port of this party's gRPC server (only the assist_trainer serves); filled by the launcher.
    address: str | None = None

    @property
    def endpoint(self) -> str | None:
        """Where to reach this party's gRPC server: filled in by the launcher, or its remote address."""
        return self.address or (self.remote.address if self.remote else None)

    @property
    def dns_name(self) -> str:
        """The party's name as a Kubernetes object name."""
        return self.name.lower().replace("_", "-").replace(".", "-")


class Endpoint(_Strict):
    address: str | None = None


class RedisSpec(_Strict):
    address: str | None = None
    persistence: bool = False
    storage: str = "1Gi"
    image: str = "redis:7.2-alpine"


class OutputStorage(_Strict):
    """Where the adapters land on Kubernetes: by default one ReadWriteOnce claim per local party
    (`<job>-output-<party>`, so parties may run on different nodes); `ReadWriteMany` makes one
    claim all parties share (`<job>-output`: name a storage class that provides that mode)."""

    size: str = "1Gi"
    storageClassName: str | None = None
    accessMode: Literal["ReadWriteOnce", "ReadWriteMany"] = "ReadWriteOnce"
    # Use this existing claim for the adapters instead of creating any.
    claimName: str | None = None

    @model_validator(mode="after")
    def _claim_or_settings(self) -> OutputStorage:
        given = self.model_fields_set & {"size", "storageClassName", "accessMode"}
        if self.claimName and given:
            raise ValueError(f"`claimName` names an existing claim: {', '.join(sorted(given))} would not apply; "
                             "remove it, or remove claimName to have fedtune create the claims")
        return self


class Storage(_Strict):
    output: OutputStorage = Field(default_factory=OutputStorage)
    # Existing claims mounted into every party pod (the pretrained model, shared data).
    volumes: list[Volume] = Field(default_factory=list)


class Tls(_Strict):
    enabled: bool = True
    # Secrets the user provides instead of the ones fedtune generates (Kubernetes only).
    caSecret: str | None = None


class ModelInfo(_Strict):
    name: Literal["horizontal_chatglm"] = "horizontal_chatglm"


class JobSpec(_Strict):
    model_info: ModelInfo = Field(default_factory=ModelInfo)
    input: Input
    # Where each party writes its adapters; unset: `fedtune run --output` / the operator's output claim decide.
    output: Output | None = None
    aggregation: Aggregation = Field(default_factory=Aggregation)
    encryption: Encryption = Field(default_factory=Encryption)
    privacy: Privacy = Field(default_factory=Privacy)
    peft: Peft
    trainer: Trainer = Field(default_factory=Trainer)
    dataset: Dataset = Field(default_factory=Dataset)
    # An assist_trainer and label_trainers; or one label_trainer alone, which trains without aggregation.
    parties: list[Party] = Field(min_length=1)
    scheduler: Endpoint = Field(default_factory=Endpoint)
    redis: RedisSpec = Field(default_factory=RedisSpec)
    image: str = "fedtune/trainer:0.1.0"
    imagePullPolicy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    storage: Storage = Field(default_factory=Storage)
    # Inside pods, relative paths in the spec resolve against this folder (mount a claim there).
    workingDir: str = Field("/workspace", pattern=r"^/")
    tls: Tls = Field(default_factory=Tls)
    backoffLimit: int = Field(3, ge=0)
    scheduling: Scheduling = Field(default_factory=Scheduling)
    runPolicy: RunPolicy = Field(default_factory=RunPolicy)

    @model_validator(mode="after")
    def _parties_make_a_federation(self) -> JobSpec:
        roles = [p.role for p in self.parties]
        if roles.count("assist_trainer") != 1 and not self.standalone:
            raise ValueError("parties: exactly one party must have role `assist_trainer` "
                             "(or a single label_trainer trains alone)")
        if "label_trainer" not in roles:
            raise ValueError("parties: at least one party must have role `label_trainer`")
        if self.standalone and self.privacy.dp is not None:
            raise ValueError("privacy.dp: a single label_trainer training alone shares no update, so there is "
                             "nothing to clip or noise; remove privacy.dp or add an assist_trainer")
        seen: dict[str, str] = {}
        for party in self.parties:
            if party.dns_name in seen:
                raise ValueError(f"parties: `{party.name}` and `{seen[party.dns_name]}` name the same party")
            seen[party.dns_name] = party.name
            if party.role == "label_trainer" and not (party.trainset or self.input.trainset):
                raise ValueError(
                    f"parties: label_trainer `{party.name}` has no trainset (set parties[].trainset or input.trainset)"
                )
            self._check_ranks(party)
        self.fractions()
        self._check_threshold()
        return self

    def _check_ranks(self, party: Party) -> None:
        if party.ranks is None or party.ranks == 1:
            return
        if not self.trainset(party):
            raise ValueError(f"parties: `{party.name}` has ranks {party.ranks} but no trainset: a party that only "
                             "aggregates runs as one process")
        if 0 < party.resources.gpu < party.ranks:
            raise ValueError(f"parties: `{party.name}` has ranks {party.ranks} but resources.gpu gives it "
                             f"{party.resources.gpu} GPUs: one rank per GPU at most")

    def _check_threshold(self) -> None:
        plus = self.encryption.secagg_plus
        if plus is None or plus.threshold is None:
            return
        n = len(self.label_trainers)
        if plus.threshold > n:
            raise ValueError(f"encryption.secagg_plus.threshold: {plus.threshold} is more than the {n} label_trainers")
        if plus.threshold < majority(n):
            raise ValueError(
                f"encryption.secagg_plus.threshold: {plus.threshold} is below a majority of the {n} label_trainers "
                f"(at least {majority(n)}): two groups of fewer could each reveal one half of a party's masks"
            )

    def secagg_threshold(self) -> int:
        """The shares a secagg_plus round needs: as configured, or a majority of the label_trainers."""
        plus = self.encryption.secagg_plus
        configured = plus.threshold if plus is not None else None
        return configured or majority(len(self.label_trainers))

    # --- derived views -------------------------------------------------------------------

    def party(self, name: str) -> Party:
        for party in self.parties:
            if party.name == name:
                return party
        raise SpecError(f"no party named `{name}` in spec.parties (have: {', '.join(p.name for p in self.parties)})")

    @property
    def standalone(self) -> bool:
        """One label_trainer alone: it trains on its own data, saving at the same points, aggregating nothing."""
        return len(self.parties) == 1 and self.parties[0].role == "label_trainer"

    @property
    def assist_trainer(self) -> Party | None:
        return next((p for p in self.parties if p.role == "assist_trainer"), None)

    @property
    def authority(self) -> Party:
        """The party whose aggregation, encryption, peft, dataset and trainer keys every party takes."""
        return self.assist_trainer or self.parties[0]

    @property
    def label_trainers(self) -> list[Party]:
        return [p for p in self.parties if p.role == "label_trainer"]

    def trainset(self, party: Party) -> list[TrainsetEntry]:
        """A label_trainer falls back to `input.trainset`; the assist_trainer trains only on its own."""
        if party.trainset is not None:
            return party.trainset
        return self.input.trainset if party.role == "label_trainer" else []

    def valset(self, party: Party) -> list[TrainsetEntry]:
        """As `trainset`: a label_trainer falls back to `input.valset`, the assist_trainer has only its own."""
        if party.valset is not None:
            return party.valset
        return self.input.valset if party.role == "label_trainer" else []

    def ranks(self, party: Party) -> int:
        """The party's data-parallel processes: `ranks`, else one per GPU; one for a party that only aggregates."""
        if not self.trainset(party):
            return 1
        return party.ranks or max(party.resources.gpu, 1)

    def ranks_field(self, party: Party) -> str:
        """The spec field a party's rank count comes from, for messages."""
        index = self.parties.index(party)
        return f"spec.parties[{index}].{'ranks' if party.ranks else 'resources.gpu'}"

    def pretrained_model(self, party: Party) -> str:
        return self.base_model(party).path

    def base_model(self, party: Party) -> PretrainedModel:
        """The party's own `pretrained_model` (path, dtype, quantization) if set, else `input.pretrained_model`."""
        return party.pretrained_model or self.input.pretrained_model

    def base_model_field(self, party: Party) -> str:
        """Where `base_model(party)` comes from, for messages."""
        if party.pretrained_model is None:
            return "input.pretrained_model"
        return f"parties[{self.parties.index(party)}].pretrained_model"

    def trainer_args(self, party: Party) -> dict[str, Any]:
        """The assist_trainer's shared trainer keys with this party's local ones on top."""
        args = self.trainer.model_dump()
        args.update({k: v for k, v in party.trainer.model_dump().items() if v is not None})
        return args

    def fractions(self) -> list[float]:
        """Aggregation points as fractions of each party's own total steps: agg_steps, 2*agg_steps, ..., 1."""
        step = self.aggregation.agg_steps
        points = [round(i * step, 6) for i in range(1, math.floor(1 / step + 1e-9) + 1)]
        if not points or points[-1] < 1:
            points.append(1.0)
        return points


class Metadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?$")
    namespace: str | None = None


class FederatedFineTune(BaseModel):
    model_config = ConfigDict(extra="allow")
    apiVersion: Literal["fedtune.io/v1alpha1"]
    kind: Literal["FederatedFineTune"]
    metadata: Metadata
    spec: JobSpec

    @property
    def job_id(self) -> str:
        return self.metadata.name


SHARED_SECTIONS = ("aggregation", "encryption", "privacy", "peft", "dataset")


def shared_config(spec: JobSpec) -> dict[str, Any]:
    """What every party takes from the assist_trainer: all but the per-party trainer keys."""
    shared = {name: getattr(spec, name).model_dump(mode="json") for name in SHARED_SECTIONS}
    trainer = spec.trainer.model_dump(mode="json")
    shared["trainer"] = {k: v for k, v in trainer.items() if k not in LOCAL_TRAINER_KEYS}
    return shared


def apply_shared_config(spec: JobSpec, shared: dict[str, Any]) -> JobSpec:
    """This party's spec with the assist_trainer's shared configuration in force."""
    data = spec.model_dump(mode="json")
    for name in SHARED_SECTIONS:
        data[name] = shared[name]
    local = {k: v for k, v in data["trainer"].items() if k in LOCAL_TRAINER_KEYS}
    data["trainer"] = {**shared["trainer"], **local}
    return JobSpec.model_validate(data)


STATE_DIR = ".fedtune-state"  # inside a party's output: resumable training state and its key


def checkpoint_name(fraction: float) -> str:
    """`checkpoint-0.2` ... `checkpoint-1`, as the reference names them."""
    return f"checkpoint-{fraction:g}"


def aggregation_steps(fractions: list[float], max_steps: int) -> list[int]:
    """The global step at which each round aggregates; two rounds on one step is an error."""
    steps = [math.ceil(f * max_steps - 1e-9) for f in fractions]
    for (f1, s1), (f2, s2) in zip(zip(fractions, steps), zip(fractions[1:], steps[1:])):
        if s1 == s2 or s1 < 1:
            raise SpecError(
                f"aggregation.agg_steps is too small: rounds at fractions {f1:g} and {f2:g} both fall on "
                f"step {max(s1, 1)} of {max_steps}; raise agg_steps or train more steps"
            )
    return steps


def expand_output_path(template: str, job_id: str, party: str) -> str:
    return template.replace("[JOB_ID]", job_id).replace("[NODE_ID]", party)


def output_dirs(job: FederatedFineTune, parties: list[str], base_dir: Path) -> dict[str, Path]:
    """Each party's folder under `spec.output.path` (relative paths against `base_dir`); two local
    parties may not share one, which a template without `[NODE_ID]` would make them do."""
    assert job.spec.output is not None
    dirs: dict[str, Path] = {}
    for name in parties:
        folder = resolve_path(expand_output_path(job.spec.output.path, job.job_id, name), base_dir).resolve()
        other = next((n for n, d in dirs.items() if d == folder), None)
        if other is not None:
            raise SpecError(f"spec.output.path: parties `{other}` and `{name}` would both write to {folder}; "
                            "put [NODE_ID] in the path")
        dirs[name] = folder
    return dirs


def resolve_path(path: str, base_dir: Path) -> Path:
    """Relative paths in a spec are relative to the job file's folder (or the launcher's --base-dir)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base_dir / p)


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for item in err.errors():
        loc = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in item["loc"]).lstrip(".")
        loc = re.sub(r"\.(function-after|model-after)\[[^\]]*\]", "", loc)
        lines.append(f"{source}: {loc or '(document)'}: {item['msg']}")
    return "\n".join(lines)


def parse_job(document: Any, source: str = "<job>") -> FederatedFineTune:
    if not isinstance(document, dict):
        raise SpecError(f"{source}: expected a FederatedFineTune mapping, got {type(document).__name__}")
    try:
        return FederatedFineTune.model_validate(document)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, source)) from None


def load_job(path: str | Path) -> FederatedFineTune:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise SpecError(f"{path}: cannot read job file: {err.strerror}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML: {err}") from None
    return parse_job(document, str(path))


def dump_job(job: FederatedFineTune) -> str:
    return yaml.safe_dump(job.model_dump(mode="json", exclude_none=True), sort_keys=False, allow_unicode=True)
