"""Answer a prompt with a base model and a fine-tuned adapter: the reference's inference snippet as a function.

The adapter folder says what it is: LoRA or P-tuning v2 (`adapter_config.json`), both loaded
with `PeftModel.from_pretrained`, or the P-tuning v2 prefix of a model that has its own prefix
encoder (`prefix_config.json`, ChatGLM), loaded as the reference's snippet does it: the
config's `pre_seq_len`, then `transformer.prefix_encoder`'s weights. Decoding is greedy, so the
same adapter always gives the same answer.

Decoding is a small greedy loop over the model's forward with a KV cache, not `generate()`:
with transformers 5 and peft 0.21, `generate()` on a prefix-tuned model silently drops the
prefix (transformers passes its own empty `cache`, which wins over the `past_key_values` peft
injects), so the answer would be the base model's. The loop puts the prefix into the cache
explicitly, exactly as a training forward pass does, and serves LoRA and the bare base the
same way. Checkpoints with their own modelling code (ChatGLM) use their own `generate()`.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch

from fedtune.models import (
    NATIVE_PREFIX_CONFIG,
    ModelError,
    apply_adapter,
    load_base_model,
    native_prefix_encoder,
    saved_adapter_kind,
    use_chatglm_prefix,
)
from fedtune.spec import Peft, PrefixTuning


def load_for_chat(model_path: str | Path, adapter_path: str | Path | None, device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode: the base alone, or with the adapter found in `adapter_path`."""
    from peft import PeftModel

    if adapter_path is not None and (Path(adapter_path) / NATIVE_PREFIX_CONFIG).is_file():
        return _load_with_own_prefix(Path(model_path), Path(adapter_path), device)
    model, tokenizer = load_base_model(model_path, device=device)
    if adapter_path is not None:
        saved_adapter_kind(adapter_path)  # a clear error for a folder that holds no adapter
        try:
            model = PeftModel.from_pretrained(model, str(adapter_path)).to(device)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise ModelError(f"{adapter_path}: cannot load the adapter onto {model_path}: {err}") from None
        if _is_prefix_tuned(model):
            use_chatglm_prefix(model)
    return model.eval(), tokenizer


def _load_with_own_prefix(model_path: Path, adapter_path: Path, device: str) -> tuple[Any, Any]:
    """The reference's inference snippet: the config's `pre_seq_len`, then the saved prefix encoder."""
    config_file = adapter_path / NATIVE_PREFIX_CONFIG
    try:
        settings = json.loads(config_file.read_text(encoding="utf-8"))
        overrides = {"pre_seq_len": int(settings["pre_seq_len"]),
                     "prefix_projection": bool(settings["prefix_projection"])}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(f"{config_file}: unreadable: {err}") from None
    model, tokenizer = load_base_model(model_path, device=device, config_overrides=overrides)
    encoder = native_prefix_encoder(model)
    if encoder is None:
        raise ModelError(f"{adapter_path} is a P-tuning v2 adapter for a model with its own prefix encoder "
                         f"(ChatGLM); {model_path} builds none")
    apply_adapter(model, Peft(PREFIX_TUNING=PrefixTuning(**overrides)), adapter_path)
    return model.eval(), tokenizer


def _is_prefix_tuned(model: Any) -> bool:
    config = getattr(model, "active_peft_config", None)
    return config is not None and str(getattr(config.peft_type, "value", config.peft_type)) == "PREFIX_TUNING"


def _stop_ids(tokenizer: Any, model: Any) -> set[int]:
    ids = model.config.eos_token_id if hasattr(model, "config") else None
    stop = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        stop.add(tokenizer.eos_token_id)
    return stop


def _uses_remote_code(model: Any) -> bool:
    return bool(getattr(getattr(model, "config", None), "auto_map", None))


def _next_cache(output: Any) -> Any:
    cache = getattr(output, "cache", None)  # transformers 5; `past_key_values` before
    return cache if cache is not None else output.past_key_values


@torch.no_grad()
def _greedy(model: Any, input_ids: torch.Tensor, max_new_tokens: int, stop: set[int]) -> list[int]:
    """Greedy decoding with a KV cache that starts with the P-tuning prefix, if any.

    Positions continue after the prefix and the mask covers it, exactly as in a training forward.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # LoRA layers are inside
    cache, prefix_len = None, 0
    if _is_prefix_tuned(model):
        cache = model.get_prompt(batch_size=1)  # a DynamicCache already holding the prefix keys/values
        prefix_len = model.active_peft_config.num_virtual_tokens
    cache_arg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    mask = torch.ones(1, prefix_len + input_ids.shape[1], dtype=torch.long, device=input_ids.device)
    step_input, answer = input_ids, []
    for _ in range(max_new_tokens):
        output = base(input_ids=step_input, attention_mask=mask, use_cache=True, **{cache_arg: cache})
        cache = _next_cache(output)
        token = int(output.logits[0, -1].argmax())
        if token in stop:
            break
        answer.append(token)
        step_input = torch.tensor([[token]], device=input_ids.device)
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
    return answer


@torch.no_grad()
def _remote_generate(model: Any, tokenizer: Any, input_ids: torch.Tensor, max_new_tokens: int,
                     stop: set[int]) -> list[int]:
    """A checkpoint with its own modelling code decodes through its own `generate`."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                            max_new_tokens=max_new_tokens, eos_token_id=sorted(stop) or None, pad_token_id=pad)
    answer = output[0, input_ids.shape[1]:].tolist()
    end = next((i for i, t in enumerate(answer) if t in stop), len(answer))  # generate() pads after EOS
    return answer[:end]


def answer_ids(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 64, *,
               stop_at_eos: bool = True) -> list[int]:
    """The generated token ids after `prompt` (encoded as in training: with the tokenizer's special tokens)."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([tokenizer(prompt, add_special_tokens=True)["input_ids"]], device=device)
    stop = _stop_ids(tokenizer, model) if stop_at_eos else set()
    if _uses_remote_code(model) and not _is_prefix_tuned(model):
        return _remote_generate(model, tokenizer, input_ids, max_new_tokens, stop)
    return _greedy(model, input_ids, max_new_tokens, stop)


def generate(model_path: str | Path, adapter_path: str | Path | None, prompt: str, max_new_tokens: int = 64,
             *, device: str = "cpu") -> str:
    """Load base (+ adapter) and return the decoded answer to `prompt` (the full prompt text)."""
    model, tokenizer = load_for_chat(model_path, adapter_path, device)
    return tokenizer.decode(answer_ids(model, tokenizer, prompt, max_new_tokens), skip_special_tokens=True).strip()
