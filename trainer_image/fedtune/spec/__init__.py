"""The FederatedFineTune job spec: one schema for `fedtune run`, every role and the operator.

It carries the reference's `trainer_config` keys with their meaning (`input`, `output`,
`aggregation`, `encryption`, `peft`, `trainer`, `dataset`), the parties, and the
Kubernetes specifics. It imports no torch: the operator validates resources with it.

One module per section (`security`, `peft`, `training`, `parties`, `runtime`, `outputs`), the whole
job in `job`; everything public is imported from `fedtune.spec`.
"""

from fedtune.spec.common import API_VERSION, KIND, KUBE_TYPE, PathRef, SpecError
from fedtune.spec.job import (
    MAX_LABEL_TRAINERS,
    MAX_PARTIES,
    FederatedFineTune,
    JobSpec,
    Metadata,
    dump_job,
    format_validation_error,
    load_job,
    parse_job,
)
from fedtune.spec.outputs import (
    STATE_DIR,
    aggregation_steps,
    checkpoint_name,
    expand_output_path,
    output_dirs,
    resolve_path,
)
from fedtune.spec.parties import Endpoint, Party, Remote, Resources, Scheduling, Volume
from fedtune.spec.peft import AdapterOptions, Lora, Peft, PrefixTuning
from fedtune.spec.runtime import OutputStorage, RedisSpec, RunPolicy, Storage
from fedtune.spec.security import SCHEMES, Csprng, Dp, Encryption, KeyExchange, Otp, Privacy, SecAggPlus, Tls, majority
from fedtune.spec.training import (
    LOCAL_TRAINER_KEYS,
    MANAGED_TRAINER_KEYS,
    Aggregation,
    Dataset,
    Input,
    ModelInfo,
    Output,
    PartyTrainer,
    PretrainedModel,
    Strategy,
    Trainer,
    TrainsetEntry,
)

__all__ = [
    "API_VERSION",
    "KIND",
    "KUBE_TYPE",
    "LOCAL_TRAINER_KEYS",
    "MANAGED_TRAINER_KEYS",
    "MAX_LABEL_TRAINERS",
    "MAX_PARTIES",
    "SCHEMES",
    "STATE_DIR",
    "AdapterOptions",
    "Aggregation",
    "Csprng",
    "Dataset",
    "Dp",
    "Encryption",
    "Endpoint",
    "FederatedFineTune",
    "Input",
    "JobSpec",
    "KeyExchange",
    "Lora",
    "Metadata",
    "ModelInfo",
    "Otp",
    "Output",
    "OutputStorage",
    "Party",
    "PartyTrainer",
    "PathRef",
    "Peft",
    "PrefixTuning",
    "PretrainedModel",
    "Privacy",
    "RedisSpec",
    "Remote",
    "Resources",
    "RunPolicy",
    "Scheduling",
    "SecAggPlus",
    "SpecError",
    "Storage",
    "Strategy",
    "Tls",
    "Trainer",
    "TrainsetEntry",
    "Volume",
    "aggregation_steps",
    "checkpoint_name",
    "dump_job",
    "expand_output_path",
    "format_validation_error",
    "load_job",
    "majority",
    "output_dirs",
    "parse_job",
    "resolve_path",
]
