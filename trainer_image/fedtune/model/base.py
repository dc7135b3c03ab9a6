"""Base models from local folders: nothing is downloaded; ChatGLM remote-code folders become native GLM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedtune.model import chatglm
from fedtune.model.folders import ModelError, check_folder, check_readable, is_chatglm, is_chatglm6b
from fedtune.model.precision import FLOAT32, Precision, quantization_config


def has_remote_code(folder: Path) -> bool:
    """A real ChatGLM checkpoint carries its modelling code (`modeling_chatglm.py`, ...) beside the weights."""
    return any(folder.glob("*.py"))


def load_base_model(
    path: str | Path, *, device: str | torch.device = "cpu", precision: Precision = FLOAT32,
    config_overrides: dict[str, Any] | None = None, field: str = "input.pretrained_model",
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a local folder; nothing is downloaded. `precision` says how the base weights are held
    (see `fedtune.model.precision`); `config_overrides` change its config before the model is built (ChatGLM's
    `pre_seq_len`). A ChatGLM2/3 or GLM-4 remote-code folder is converted to the native GLM
    (`fedtune.model.chatglm`); upstream's ChatGLM-6B folder loads into `fedtune.model.chatglm6b`."""
    from transformers import CONFIG_MAPPING

    folder = Path(path)
    check_readable(folder)
    if not folder.is_dir():
        raise ModelError(f"{folder}: pretrained model folder not found")
    config = check_folder(folder, CONFIG_MAPPING)  # the format and every weight shard, named if wrong
    if is_chatglm6b(config) and is_chatglm(config):  # upstream's ChatGLM-6B folder: fedtune's implementation
        if precision.quantization is not None:
            raise ModelError(f"{field}.quantization: {folder} is upstream's ChatGLM-6B folder; convert it once "
                             "(fedtune convert SRC DST) and quantise the native DST")
        from fedtune.model.chatglm6b import loading

        model, tokenizer = loading.load_model(folder, precision.dtype, config_overrides), loading.load_tokenizer(folder)
    elif is_chatglm(config):
        if precision.quantization is not None:
            raise ModelError(f"{field}.quantization: {folder} is a ChatGLM remote-code folder, converted at load in "
                             "full precision; convert it once (fedtune convert SRC DST) and quantise the native DST")
        model, tokenizer = chatglm.load_native(folder, precision.dtype), chatglm.load_tokenizer(folder)
    else:
        model, tokenizer = _load_with_transformers(folder, precision, device, config_overrides)
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out, any id will do
    return (model if precision.quantization else model.to(device)), tokenizer


def _load_with_transformers(folder: Path, precision: Precision, device: str | torch.device,
                            config_overrides: dict[str, Any] | None) -> tuple[nn.Module, Any]:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    remote = has_remote_code(folder)
    common: dict[str, Any] = {"local_files_only": True, "trust_remote_code": remote}
    weights: dict[str, Any] = {"dtype": precision.dtype}
    if precision.quantization is not None:  # bitsandbytes places the quantised weights itself
        weights.update(quantization_config=quantization_config(precision), device_map={"": torch.device(device)})
    # A folder's own code may fail in any way on this transformers version: say which folder, and why.
    failures = (OSError, ValueError, KeyError, RuntimeError) + ((AttributeError, TypeError, ImportError, NameError)
                                                                if remote else ())
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **common)
        if config_overrides:
            common["config"] = AutoConfig.from_pretrained(folder, **common, **config_overrides)
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, **weights, **common)
        except ValueError:
            if not remote:
                raise
            # Checkpoints whose code maps only AutoModel to their causal-LM class.
            model = AutoModel.from_pretrained(folder, **weights, **common)
    except failures as err:
        code = " (in the folder's own modelling code)" if remote else ""
        raise ModelError(f"{folder}: cannot load the model{code}: {type(err).__name__}: {err}") from None
    if remote:
        # transformers gives a remote class GenerationMixin (which peft's causal-LM wrapper needs) only the first
        # time a process loads it; later loads take the bare class it registered. Make every load alike.
        from transformers.models.auto.auto_factory import add_generation_mixin_to_remote_model

        model.__class__ = add_generation_mixin_to_remote_model(type(model))
    return model, tokenizer
