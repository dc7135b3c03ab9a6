"""ChatGLM-6B folders as this package's model and tokenizer: upstream's (its weights carry the same names) or
converted ones; `convert` writes a folder that transformers' Auto classes load once fedtune is imported."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from fedtune.files import staged_dir
from fedtune.model.chatglm6b.configuration import ChatGLM6BConfig
from fedtune.model.chatglm6b.modeling import ChatGLM6BForCausalLM
from fedtune.model.chatglm6b.tokenization import ChatGLM6BTokenizer
from fedtune.model.folders import (
    ModelError,
    check_chatglm6b,
    check_chatglm6b_tokenizer,
    checkpoint_files,
    has_weights,
    read_config,
)

log = logging.getLogger(__name__)
RANDOM_SEED = 42
# Keys of upstream's config.json that say where it came from, not what it is.
_NOT_CARRIED = ("model_type", "auto_map", "architectures", "_name_or_path", "transformers_version", "torch_dtype")


def config_of(folder: Path, overrides: dict[str, Any] | None = None) -> ChatGLM6BConfig:
    raw = read_config(folder)
    check_chatglm6b(raw, folder)
    settings = {k: v for k, v in raw.items() if k not in _NOT_CARRIED}
    config = ChatGLM6BConfig(**{**settings, **(overrides or {})})
    config.architectures = ["ChatGLM6BForCausalLM"]
    return config


def load_model(folder: Path, dtype: torch.dtype, overrides: dict[str, Any] | None = None) -> ChatGLM6BForCausalLM:
    config = config_of(folder, overrides)
    if not has_weights(folder):
        return random_model(folder, config, dtype)
    checkpoint_files(folder)  # every shard its index names, or say which is missing
    try:
        model = ChatGLM6BForCausalLM.from_pretrained(folder, config=config, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelError(f"{folder}: cannot load ChatGLM-6B weights: {type(err).__name__}: {err}") from None
    return model.eval()


def random_model(folder: Path, config: ChatGLM6BConfig, dtype: torch.dtype) -> ChatGLM6BForCausalLM:
    """A folder with config and code but no weights (the reference's demo folder) is built from its config
    with random weights, as the reference does; from a fixed seed, so that every party builds the same."""
    log.warning("%s: no weights: built from config.json with random weights (seed %d), as the reference does",
                folder, RANDOM_SEED)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(RANDOM_SEED)
        model = ChatGLM6BForCausalLM(config)
    return model.to(dtype).eval()


def load_tokenizer(folder: Path) -> ChatGLM6BTokenizer:
    check_chatglm6b_tokenizer(folder)
    return ChatGLM6BTokenizer.from_pretrained(folder, local_files_only=True)


def convert(src: Path, dst: Path) -> Path:
    """`fedtune convert` for ChatGLM-6B: safetensors weights, model type `chatglm6b`, the same tokenizer."""
    config = read_config(src)
    dtype = getattr(torch, str(config.get("torch_dtype", "float32")), torch.float32)
    model, tokenizer = load_model(src, dtype), load_tokenizer(src)
    with staged_dir(dst.resolve()) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return dst
