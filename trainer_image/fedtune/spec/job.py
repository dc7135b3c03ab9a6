"""The whole job (`JobSpec`, `FederatedFineTune`), its checks across sections, and reading/writing YAML."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedtune.spec.common import SpecError, Strict
from fedtune.spec.parties import ControlPlane, Endpoint, Party, Scheduling
from fedtune.spec.peft import Peft
from fedtune.spec.runtime import RedisSpec, RunPolicy, Storage
from fedtune.spec.security import Encryption, Privacy, Tls, majority
from fedtune.spec.training import (
    Aggregation,
    Dataset,
    Input,
    ModelInfo,
    Output,
    PretrainedModel,
    Trainer,
    TrainsetEntry,
)

# How many label_trainers one job federates. The FederatedFineTune CRD bounds spec.parties (these and the
# assist_trainer) because Kubernetes refuses a CRD whose validation rules it cannot bound the cost of, and
# those rules walk the parties; a job that Kubernetes would refuse is refused everywhere, at validation.
MAX_LABEL_TRAINERS = 64
MAX_PARTIES = MAX_LABEL_TRAINERS + 1


class JobSpec(Strict):
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
    # Where the scheduler and Redis run (by default on no GPU node: none of spec.scheduling's placement).
    controlPlane: ControlPlane = Field(default_factory=ControlPlane)
    runPolicy: RunPolicy = Field(default_factory=RunPolicy)

    @model_validator(mode="after")
    def _parties_make_a_federation(self) -> JobSpec:
        roles = [p.role for p in self.parties]
        if len(self.parties) > MAX_PARTIES:
            raise ValueError(f"parties: {len(self.parties)} parties; a job federates at most {MAX_LABEL_TRAINERS} "
                             f"label_trainers and its assist_trainer ({MAX_PARTIES} parties: the bound the "
                             "FederatedFineTune CRD sets so that Kubernetes can bound the cost of its validation "
                             "rules, which walk the parties)")
        if roles.count("assist_trainer") != 1 and not self.standalone:
            raise ValueError("parties: exactly one party must have role `assist_trainer` "
                             "(or a single label_trainer trains alone)")
        if "label_trainer" not in roles:
            raise ValueError("parties: at least one party must have role `label_trainer`")
        if self.standalone and self.privacy.dp is not None:
            raise ValueError("privacy.dp: a single label_trainer training alone shares no update, so there is "
                             "nothing to clip or noise; remove privacy.dp or add an assist_trainer")
        if self.standalone and self.aggregation.strategy.name != "fedavg":
            raise ValueError(f"aggregation.strategy: {self.aggregation.strategy.name} steps a server optimizer "
                             "along the parties' mean; a single label_trainer training alone has none "
                             "(add an assist_trainer)")
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
        self._check_dp_weighting()
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
        masking = self.encryption.masking
        if masking is None:
            return
        n, c = len(self.label_trainers), masking.max_colluders
        field = f"encryption.{self.encryption.scheme}"
        if c >= n:
            raise ValueError(f"{field}.max_colluders: {c} of the {n} label_trainers would leave no honest one to "
                             "protect")
        plus = self.encryption.secagg_plus
        if plus is None:
            return
        need = majority(n, c)  # at most n, as c < n
        if plus.threshold is None:
            return
        if plus.threshold > n:
            raise ValueError(f"{field}.threshold: {plus.threshold} is more than the {n} label_trainers")
        if plus.threshold < need:
            raise ValueError(
                f"{field}.threshold: {plus.threshold} is not above (n + max_colluders)/2 = {(n + c) / 2:g} for {n} "
                f"label_trainers and {c} colluders (at least {need}): two groups of fewer could each reveal one "
                "half of a party's masks"
            )

    def _check_dp_weighting(self) -> None:
        """Under privacy.dp every party weighs 1/n, n from its own file: with sample weights a party's
        sensitivity would rest on sample counts only the host sees (it could understate it)."""
        if self.privacy.dp is None:
            return
        if "weighting" not in self.aggregation.model_fields_set:
            self.aggregation.weighting = "uniform"
        elif self.aggregation.weighting != "uniform":
            raise ValueError("aggregation.weighting: privacy.dp needs `uniform` weights (each party's sensitivity "
                             "C/n then follows from its own job file; sample weights rest on counts only the "
                             "host sees)")

    def secagg_threshold(self) -> int:
        """The shares a secagg_plus round needs: as configured, or the least above (n + max_colluders)/2."""
        plus = self.encryption.secagg_plus
        configured = plus.threshold if plus is not None else None
        colluders = plus.max_colluders if plus is not None else 0
        return configured or majority(len(self.label_trainers), colluders)

    def training_parties(self) -> list[Party]:
        """The parties that train (and so contribute an update): every label_trainer, and the
        assist_trainer when it has a trainset of its own."""
        return [p for p in self.parties if p.role == "label_trainer" or self.trainset(p)]

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
        """The party that serves the global adapter: the assist_trainer, or a party training alone."""
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
        """The job's trainer keys (part of its terms) with this party's local ones on top."""
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
