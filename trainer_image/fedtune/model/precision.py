"""How a party holds the base model: its dtype, optional 4/8-bit quantisation, and the matching mixed precision.

`input.pretrained_model.dtype` (or a party's own `pretrained_model.dtype`) says how the frozen base
weights are held; `auto` picks bfloat16 on GPUs that support it, float16 on other GPUs and float32
on the CPU. Adapters are never held in half precision: they train in float32 (the optimizer's
updates of small adapter weights would round away in 16 bits), and `models.adapter_state` hands
float32 copies to aggregation. The Trainer computes in the base's dtype under autocast (`bf16` or
`fp16`, the latter with its loss scaler), so a half-precision base always trains with mixed
precision and a user's `trainer.bf16` / `trainer.fp16` may not contradict it.

`quantization: 4bit | 8bit` loads the base through bitsandbytes (QLoRA); it needs a CUDA device and
the `qlora` extra, and is refused clearly otherwise, before anything is loaded.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Literal

import torch

from fedtune.spec import PretrainedModel, SpecError

DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MIXED_PRECISION_FLAG: dict[torch.dtype, str] = {torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype = torch.float32
    quantization: Literal["4bit", "8bit"] | None = None

    @property
    def dtype_name(self) -> str:
        return next(name for name, dtype in DTYPES.items() if dtype == self.dtype)

    def describe(self) -> str:
        quantized = f", {self.quantization} quantised" if self.quantization else ""
        return f"base weights in {self.dtype_name}{quantized}, adapters in float32"


FLOAT32 = Precision()  # what a model is loaded in unless a job says otherwise


def _gpu_has_bfloat16() -> bool:
    return torch.cuda.is_bf16_supported(including_emulation=False)


def _gpu_name() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} (compute capability {major}.{minor})"


def resolve_precision(base: PretrainedModel, device: str | torch.device,
                      field: str = "input.pretrained_model") -> Precision:
    """The dtype and quantisation this party uses on `device`; SpecError naming the field if the device cannot."""
    on_gpu = torch.device(device).type == "cuda"
    if base.dtype == "auto":
        dtype = (torch.bfloat16 if _gpu_has_bfloat16() else torch.float16) if on_gpu else torch.float32
    else:
        dtype = DTYPES[base.dtype]
    if dtype == torch.float16 and not on_gpu:
        raise SpecError(f"{field}.dtype: float16 needs a GPU (its mixed-precision training with a loss scaler runs "
                        "only on CUDA); this party runs on the CPU: use bfloat16, float32 or auto")
    if dtype == torch.bfloat16 and on_gpu and not _gpu_has_bfloat16():
        raise SpecError(f"{field}.dtype: bfloat16 is not supported by {_gpu_name()}; use float16 or auto")
    if base.quantization is not None:
        _check_quantization(base.quantization, on_gpu, field)
    return Precision(dtype=dtype, quantization=base.quantization)


def _check_quantization(bits: str, on_gpu: bool, field: str) -> None:
    if not on_gpu:
        raise SpecError(f"{field}.quantization: {bits} base weights (bitsandbytes) need a CUDA device; this party "
                        "runs on the CPU: remove the field or run the party on a GPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SpecError(f"{field}.quantization: {bits} needs bitsandbytes, which is not installed "
                        "(pip install 'fedtune[qlora]')")


def quantization_config(precision: Precision) -> Any:
    """transformers' BitsAndBytesConfig for QLoRA: NF4 with double quantisation, computing in the base's dtype."""
    from transformers import BitsAndBytesConfig

    if precision.quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=precision.dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def with_mixed_precision(trainer_args: dict[str, Any], precision: Precision, field: str) -> dict[str, Any]:
    """`trainer_args` with the Trainer's autocast matching the base dtype; contradicting flags are refused."""
    wanted = MIXED_PRECISION_FLAG.get(precision.dtype)
    if wanted is None:  # a float32 base: the user's own bf16/fp16 autocast, if any, is theirs to choose
        return dict(trainer_args)
    args = dict(trainer_args)
    for flag in MIXED_PRECISION_FLAG.values():
        given = args.get(flag)
        if given is not None and bool(given) != (flag == wanted):
            raise SpecError(f"trainer.{flag}: {given} contradicts {field}.dtype, which holds the base in "
                            f"{precision.dtype_name} here and trains with {wanted} mixed precision; "
                            f"remove trainer.{flag}")
        args[flag] = flag == wanted
    return args
