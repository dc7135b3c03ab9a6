"""What a model folder holds, read as data: config.json, its weight files, and whether fedtune can load its format.

No torch here: `fedtune run` checks every party's model folder before it starts a process.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Container
from pathlib import Path
from typing import Any

WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class ModelError(ValueError):
    """A model, adapter or adapter state that cannot be used; the message names the path, key or tensor."""


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{folder}: no config.json: not a transformers model folder") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"{path}: unreadable: {err}") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path}: not a json object")
    return config


def is_chatglm(config: dict[str, Any]) -> bool:
    return config.get("model_type") == "chatglm"


def version(config: dict[str, Any]) -> str:
    """Which ChatGLM2/3 / GLM-4 this is, for messages (ChatGLM-6B, v1, has a section of its own below)."""
    missing = [k for k in ("num_layers", "hidden_size", "ffn_hidden_size", "kv_channels", "num_attention_heads",
                           "padded_vocab_size") if k not in config]
    if missing:
        raise ModelError(f"config.json: model_type chatglm without {', '.join(missing)}: not a ChatGLM2/ChatGLM3/GLM-4 "
                         "config")
    return "GLM-4" if int(config["padded_vocab_size"]) >= 150000 else "ChatGLM2/ChatGLM3"


def checkpoint_files(folder: Path) -> list[Path]:
    """The weight files of a folder: every shard its index names (each must exist), or the single file."""
    for index_name in WEIGHT_INDEXES:
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ModelError(f"{index}: unreadable shard index: {err}") from None
            shards = [folder / name for name in dict.fromkeys(weight_map.values())]
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise ModelError(f"{folder}: shard {missing[0]} named by {index_name} is missing "
                                 f"({len(missing)} of {len(shards)} missing)")
            return shards
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    raise ModelError(f"{folder}: no weights ({' or '.join(WEIGHT_FILES)}, or a shard index)")


def has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in (*WEIGHT_INDEXES, *WEIGHT_FILES))


def check_readable(folder: Path) -> None:
    """Every file of a model or adapter folder can be read by this process.

    The libraries that load them report a file they may not read as missing (safetensors: "No
    such file or directory"), so this says it first: which file, and which user cannot read it
    (pods run as uid 10001; fedtune writes models and adapters 0644, `fedtune.files`)."""
    who = f"this process (uid {os.getuid()})"
    try:
        entries = sorted(folder.iterdir())
    except PermissionError:
        raise ModelError(f"{folder}: permission denied: {who} cannot open the folder or one above it") from None
    except OSError:
        return  # missing, or not a folder: the caller says so in its own words
    for path in entries:
        if path.is_file():
            try:
                path.open("rb").close()
            except PermissionError:
                raise ModelError(f"{path}: permission denied: {who} cannot read it (mode "
                                 f"{path.stat().st_mode & 0o777:04o}); make it readable, e.g. chmod a+r") from None


def check_folder(folder: Path, known_types: Container[str] | None = None) -> dict[str, Any]:
    """A model folder's config.json, once its format is one fedtune loads and every weight shard is present.

    `known_types`: the model types transformers implements (not checked without it, as importing
    transformers costs seconds the launcher's preflight should not spend).
    """
    check_readable(folder)
    config = read_config(folder)
    model_type = config.get("model_type")
    if is_chatglm6b(config):
        check_chatglm6b(config, folder)
        if not has_weights(folder):
            return config  # built from its config with random weights, as the reference's demo folder is
    elif is_chatglm(config):
        check_convertible(config, folder)
    elif known_types is not None and model_type not in known_types and "auto_map" not in config:
        raise ModelError(f"{folder / 'config.json'}: model_type {model_type!r} is not a format fedtune loads: a native "
                         "transformers causal LM (glm, glm4, ...), a folder with its own modelling code (auto_map), or "
                         "a ChatGLM2/ChatGLM3/GLM-4 remote-code folder (model_type chatglm)")
    checkpoint_files(folder)
    return config


# --- ChatGLM remote-code folders (converted by fedtune.model.chatglm) ----------------------------


def check_convertible(config: dict[str, Any], folder: Path) -> None:
    name = version(config)
    unsupported = {
        "quantization_bit": lambda v: v not in (None, 0),
        "rmsnorm": lambda v: v is False,
        "apply_residual_connection_post_layernorm": lambda v: v is True,
        "post_layer_norm": lambda v: v is False,
        "add_bias_linear": lambda v: v is True,
        "original_rope": lambda v: v is False,
    }
    for key, bad in unsupported.items():
        if key in config and bad(config[key]):
            raise ModelError(f"{folder / 'config.json'}: {key} {config[key]!r}: this {name} variant has no native "
                             "transformers GLM equivalent (a quantised checkpoint: use its full-precision original "
                             "and pretrained_model.quantization)")
    rope_ratio_scales_positions(config, folder)


def rope_ratio_scales_positions(config: dict[str, Any], folder: Path) -> bool:
    """How a ChatGLM folder's `rope_ratio` stretches the rotary embedding, as its own code says: ChatGLM2-6B-32k
    divides the positions by it (linear interpolation), ChatGLM3 and GLM-4 multiply the base by it."""
    if float(config.get("rope_ratio", 1)) == 1:
        return False
    code = folder / "modeling_chatglm.py"
    text = code.read_text(encoding="utf-8", errors="replace") if code.is_file() else ""
    positions = re.search(r"/\s*self\.rope_ratio", text) is not None
    base = re.search(r"base\s*\*\s*self\.rope_ratio", text) is not None
    if positions != base:
        return positions
    says = "says both" if positions else "does not say" if text else "is missing, so nothing says"
    raise ModelError(f"{folder / 'config.json'}: rope_ratio {config['rope_ratio']}: {code.name} {says} "
                     "whether it divides the positions "
                     "(ChatGLM2-6B-32k) or multiplies the rotary base (ChatGLM3, GLM-4); keep the checkpoint's own "
                     "code beside its weights")


# --- ChatGLM-6B (v1): fedtune.model.chatglm6b --------------------------------------------------
# Upstream's folders say `model_type: chatglm` with GLM-130B's keys (`position_encoding_2d`,
# `inner_hidden_size`); a converted one says `chatglm6b`. Refused, naming the file and the field: a
# quantised one, one without 2D positions, one without its tokenizer (`ice_text.model`) or with another,
# a P-tuning checkpoint whose `pre_seq_len` differs from the one asked for.

TOKENIZER_FILE = "ice_text.model"
# The pieces that make a sentencepiece model ChatGLM-6B's: its specials follow 130,000 text pieces.
TOKENIZER_PIECES = (b"[gMASK]", b"<sop>", b"<eop>", b"<|blank_2|>")
CONVERTED_TYPE = "chatglm6b"


def is_chatglm6b(config: dict[str, Any]) -> bool:
    return config.get("model_type") == CONVERTED_TYPE or (
        config.get("model_type") == "chatglm" and ("position_encoding_2d" in config or "inner_hidden_size" in config))


def check_chatglm6b(config: dict[str, Any], folder: Path) -> None:
    """A ChatGLM-6B folder fedtune can load: full precision, 2D positions, its own tokenizer."""
    path = folder / "config.json"
    if config.get("quantization_bit") not in (None, 0):
        raise ModelError(f"{path}: quantization_bit {config['quantization_bit']}: a quantised ChatGLM-6B checkpoint; "
                         "use the full-precision folder with pretrained_model.quantization")
    if config.get("position_encoding_2d", True) is not True:
        raise ModelError(f"{path}: position_encoding_2d {config['position_encoding_2d']!r}: only ChatGLM-6B's 2D "
                         "positions are implemented")
    missing = [k for k in ("hidden_size", "num_layers", "num_attention_heads", "inner_hidden_size", "vocab_size")
               if k not in config]
    if missing:
        raise ModelError(f"{path}: a ChatGLM-6B config without {', '.join(missing)}")
    if int(config["hidden_size"]) % (2 * int(config["num_attention_heads"])):
        raise ModelError(f"{path}: hidden_size {config['hidden_size']} is not a multiple of twice "
                         f"num_attention_heads {config['num_attention_heads']}, as 2D positions need")
    check_chatglm6b_tokenizer(folder)


def check_chatglm6b_tokenizer(folder: Path) -> None:
    tokenizer = folder / TOKENIZER_FILE
    try:
        data = tokenizer.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"{folder}: no {TOKENIZER_FILE} (ChatGLM-6B's tokenizer)") from None
    except OSError as err:
        raise ModelError(f"{tokenizer}: unreadable: {err}") from None
    absent = [piece.decode() for piece in TOKENIZER_PIECES if piece not in data]
    if absent:
        raise ModelError(f"{tokenizer}: not ChatGLM-6B's ice_text.model (no {', '.join(absent)} piece)")
    settings = folder / "tokenizer_config.json"
    if settings.is_file():
        try:
            named = json.loads(settings.read_text(encoding="utf-8")).get("vocab_file", TOKENIZER_FILE)
        except (OSError, ValueError, AttributeError) as err:
            raise ModelError(f"{settings}: unreadable: {err}") from None
        if Path(str(named)).name != TOKENIZER_FILE:
            raise ModelError(f"{settings}: vocab_file {named!r}: ChatGLM-6B's tokenizer is {TOKENIZER_FILE}")


def check_chatglm6b_prefix(checkpoint: Path, pre_seq_len: int, prefix_projection: bool) -> None:
    """A P-tuning checkpoint's `prefix_config.json` against the job's `peft.PREFIX_TUNING` settings."""
    path = checkpoint / "prefix_config.json"
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: unreadable: {err}") from None
    for key, wanted in (("pre_seq_len", pre_seq_len), ("prefix_projection", prefix_projection)):
        if key in saved and saved[key] != wanted:
            raise ModelError(f"{path}: {key} {saved[key]!r} differs from peft.PREFIX_TUNING.{key} {wanted!r}")
