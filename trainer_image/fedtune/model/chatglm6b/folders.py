"""What a ChatGLM-6B (v1) folder holds, checked as data before anything loads it (no torch).

Upstream's folders say `model_type: chatglm` with GLM-130B's keys (`position_encoding_2d`,
`inner_hidden_size`); a converted one says `chatglm6b`. Either is refused here, naming the file and
the field, when it is quantised, has no 2D positions, lacks its tokenizer (`ice_text.model`) or holds
another, or when a P-tuning checkpoint's `pre_seq_len` differs from the one asked for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedtune.model.folders import ModelError

TOKENIZER_FILE = "ice_text.model"
# The pieces that make a sentencepiece model ChatGLM-6B's: its specials follow 130,000 text pieces.
TOKENIZER_PIECES = (b"[gMASK]", b"<sop>", b"<eop>", b"<|blank_2|>")
CONVERTED_TYPE = "chatglm6b"


def is_chatglm6b(config: dict[str, Any]) -> bool:
    return config.get("model_type") == CONVERTED_TYPE or (
        config.get("model_type") == "chatglm" and ("position_encoding_2d" in config or "inner_hidden_size" in config))


def check(config: dict[str, Any], folder: Path) -> None:
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
    check_tokenizer(folder)


def check_tokenizer(folder: Path) -> None:
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


def check_prefix(checkpoint: Path, pre_seq_len: int, prefix_projection: bool) -> None:
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
