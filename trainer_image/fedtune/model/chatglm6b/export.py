"""Checkpoints trained on ChatGLM-6B, written for the reference's inference snippet (upstream's code and the
peft of its time, `PeftModel.from_pretrained` or `transformer.prefix_encoder.load_state_dict`).

The parameter names are already upstream's, so the weights are copied as they are. What changes is a
LoRA's `adapter_config.json`: today's peft writes keys the older peft refuses, so only the keys it knows
are kept, once what the others say is their default (a LoRA that needs them cannot be written for it).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from fedtune.files import staged_dir
from fedtune.model.chatglm import read_tensors
from fedtune.model.folders import ModelError
from fedtune.model.names import ADAPTER_FILES, NATIVE_PREFIX_CONFIG, PREFIX_WEIGHTS

# The LoraConfig keys of the reference's peft (0.5): all it reads.
REFERENCE_LORA_KEYS = ("peft_type", "task_type", "inference_mode", "r", "target_modules", "lora_alpha", "lora_dropout",
                       "fan_in_fan_out", "bias", "modules_to_save", "init_lora_weights", "layers_to_transform",
                       "layers_pattern", "base_model_name_or_path", "revision")
# Newer keys and the value that means "not used"; any other value has no equivalent there.
UNUSED = {"rank_pattern": {}, "alpha_pattern": {}, "use_dora": False, "use_rslora": False, "lora_bias": False,
          "layer_replication": None, "exclude_modules": None, "trainable_token_indices": None,
          "target_parameters": None}
_LAYER = re.compile(r"(^|\.)transformer\.layers\.\d+\.(attention|mlp)\.")


def is_chatglm6b_checkpoint(checkpoint: Path) -> bool:
    """A checkpoint of ChatGLM-6B's own prefix encoder, or a LoRA naming ChatGLM-6B's layers."""
    if (checkpoint / NATIVE_PREFIX_CONFIG).is_file() and not (checkpoint / "adapter_config.json").is_file():
        return True
    weights = next((checkpoint / name for name in ADAPTER_FILES if (checkpoint / name).is_file()), None)
    first = next(read_tensors(weights), None) if weights is not None else None
    return first is not None and _LAYER.search(first[0]) is not None


def export_adapter(checkpoint: Path, dst: Path) -> Path:
    with staged_dir(dst.resolve()) as staging:
        if (checkpoint / NATIVE_PREFIX_CONFIG).is_file():
            for name in (PREFIX_WEIGHTS, NATIVE_PREFIX_CONFIG):
                shutil.copyfile(checkpoint / name, staging / name)
        else:
            config = _reference_lora_config(checkpoint / "adapter_config.json")
            for name in ADAPTER_FILES:
                if (checkpoint / name).is_file():
                    shutil.copyfile(checkpoint / name, staging / name)
            (staging / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return dst


def _reference_lora_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"{path}: not an adapter checkpoint: {err}") from None
    if config.get("peft_type") != "LORA":
        raise ModelError(f"{path}: peft_type {config.get('peft_type')!r}: only LoRA and ChatGLM-6B's own prefix "
                         "encoder load into the reference's code")
    for key, unused in UNUSED.items():
        if config.get(key, unused) not in (unused, None):
            raise ModelError(f"{path}: {key} {config[key]!r} has no equivalent in the reference's peft")
    return {key: config[key] for key in REFERENCE_LORA_KEYS if key in config}
