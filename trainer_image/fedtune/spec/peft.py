"""`peft`: which adapter the parties train and its settings (LoRA, P-tuning v2, any peft type)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedtune.spec.common import Strict


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


class PrefixTuning(Strict):
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
