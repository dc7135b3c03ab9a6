"""LoRA / P-tuning v2 (and every other peft) adapters on a base model, and the adapter weights that travel.

Only adapter weights ever leave a party: `adapter_state` is exactly the trainable parameters
(LoRA matrices, or the P-tuning prefix encoder), `load_adapter_state` copies a received state into
those same parameter tensors (so an optimizer holding them keeps working), and `save_checkpoint`
writes a checkpoint atomically.

Checkpoint format (`save_checkpoint`):
- LoRA: peft's own (`adapter_config.json`, `adapter_model.safetensors`): `PeftModel.from_pretrained`.
- P-tuning v2: peft's own as well (`PeftModel.from_pretrained` loads it; `fedtune chat` does), plus
  `pytorch_model.bin` holding the raw prefix-encoder weights under `transformer.prefix_encoder.*`,
  the reference's layout (its inference snippet loads it into a ChatGLM-6B), which is also what
  continuing training reads (peft's file keeps only the projected prefix when
  `prefix_projection` is on).
- P-tuning v2 on a checkpoint whose own code builds the prefix encoder (ChatGLM-6B/2/3: its
  config declares `pre_seq_len`): `pytorch_model.bin` with the model's own
  `transformer.prefix_encoder.*` weights, exactly what the reference's inference snippet loads,
  plus `prefix_config.json` (`pre_seq_len`, `prefix_projection`) saying how to rebuild it.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedtune.files import staged_dir
from fedtune.model import chatglm
from fedtune.model.base import has_remote_code
from fedtune.model.folders import ModelError, check_readable, is_chatglm6b
from fedtune.model.names import NATIVE_PREFIX_CONFIG, PREFIX_WEIGHTS, REFERENCE_PREFIX, SOURCE_KEY
from fedtune.spec import Peft, PrefixTuning

# ChatGLM's module names (what the reference's configs target) and what native models call them.
# Each alternative is tried in order; the first whose modules all exist in the model wins.
TARGET_ALIASES: dict[str, tuple[tuple[str, ...], ...]] = {
    "query_key_value": (
        ("q_proj", "k_proj", "v_proj"), ("qkv_proj",), ("Wqkv",), ("query", "key", "value"), ("c_attn",),
    ),
    "dense": (("o_proj",), ("out_proj",)),
    "dense_h_to_4h": (("gate_up_proj",), ("gate_proj", "up_proj"), ("fc1",)),
    "dense_4h_to_h": (("down_proj",), ("fc2",)),
}

# transformers 5 renamed the forward's `past_key_values` to `cache`; peft still passes the old
# name for the prefix, which transformers accepts with this warning on every step.
warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)
# peft 0.21 still asks transformers 5 models the old name of this property.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


# --- adapters -----------------------------------------------------------------------------


def _module_names(model: nn.Module) -> set[str]:
    """Last name component of every linear-like module (what LoRA `target_modules` match against)."""
    from transformers.pytorch_utils import Conv1D

    return {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, nn.Linear | Conv1D)}


def map_target_modules(model: nn.Module, targets: list[str], field: str = "peft.LORA.target_modules",
                       ) -> tuple[list[str], list[str]]:
    """Map ChatGLM module names onto the model's own; returns (targets, notes on what was mapped)."""
    present = _module_names(model)
    mapped: list[str] = []
    notes: list[str] = []
    for target in targets:
        if target in present:
            mapped.append(target)
            continue
        group = next((g for g in TARGET_ALIASES.get(target, ()) if all(m in present for m in g)), None)
        if group is None:
            raise ModelError(
                f"{field}: `{target}` is not a module of {type(model).__name__} "
                f"(its linear layers: {', '.join(sorted(present))})"
            )
        mapped.extend(m for m in group if m not in mapped)
        notes.append(f"{target} -> {', '.join(group)}")
    return mapped, notes


def peft_config_class(kind: str) -> type:
    """peft's config class for an adapter type, or a ModelError naming the types peft has."""
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING

    known = {str(getattr(k, "value", k)): v for k, v in PEFT_TYPE_TO_CONFIG_MAPPING.items()}
    if kind not in known:
        raise ModelError(f"peft.{kind}: not an adapter type of peft (it has {', '.join(sorted(known))})")
    return known[kind]


def check_peft_keys(peft_spec: Peft) -> None:
    """The type is one of peft's and every key under `peft.<TYPE>` a field of its config (P-tuning v2
    keeps the reference's own names, which its schema checks)."""
    kind = peft_spec.kind
    if kind == "PREFIX_TUNING":
        return
    config_class = peft_config_class(kind)
    known = {f.name for f in dataclasses.fields(config_class)}
    for key in peft_spec.options():
        if key not in known:
            raise ModelError(f"peft.{kind}.{key}: not an option of peft's {config_class.__name__}")


# Options naming modules, as LoRA's `target_modules` does: ChatGLM's names are mapped onto the model's.
_MODULE_OPTIONS = ("target_modules", "feedforward_modules")


def peft_config(model: nn.Module, peft_spec: Peft) -> tuple[Any, list[str]]:
    """peft's config for the spec's adapter type (other than P-tuning v2), module names mapped;
    returns (config, notes on what was mapped)."""
    from fedtune.model.adalora import adalora_options

    check_peft_keys(peft_spec)
    kind = peft_spec.kind
    options = peft_spec.options()
    notes: list[str] = []
    for key in _MODULE_OPTIONS:
        if isinstance(options.get(key), list):
            options[key], mapped = map_target_modules(model, options[key], f"peft.{kind}.{key}")
            notes += [n for n in mapped if n not in notes]
    if kind == "ADALORA":
        options = adalora_options(options)
    try:
        return peft_config_class(kind)(**options), notes
    except Exception as err:  # a config's own checks: ValueError, TypeError, ImportError of what it needs, ...
        raise ModelError(f"peft.{kind}: {err}") from None


def prefix_config(model: nn.Module, spec: PrefixTuning) -> Any:
    """P-tuning v2 as ChatGLM-6B does it: `pre_seq_len` trainable key/value prefixes in every layer."""
    from peft import PrefixTuningConfig

    hidden = spec.prefix_hidden_size or getattr(model.config, "hidden_size", None)
    return PrefixTuningConfig(
        task_type=spec.task_type,
        num_virtual_tokens=spec.pre_seq_len,
        prefix_projection=spec.prefix_projection,
        encoder_hidden_size=hidden,
    )


def saved_adapter_kind(adapter_dir: str | Path) -> str:
    """The adapter type (LORA, PREFIX_TUNING, IA3, ...) from a saved adapter's `adapter_config.json`."""
    check_readable(Path(adapter_dir))
    if (Path(adapter_dir) / NATIVE_PREFIX_CONFIG).is_file():
        return "PREFIX_TUNING"
    config_file = Path(adapter_dir) / "adapter_config.json"
    try:
        peft_type = json.loads(config_file.read_text(encoding="utf-8")).get("peft_type")
    except FileNotFoundError:
        raise ModelError(f"{adapter_dir}: not an adapter folder (no adapter_config.json)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"{config_file}: unreadable: {err}") from None
    if not isinstance(peft_type, str) or not peft_type:
        raise ModelError(f"{config_file}: no peft_type: not a peft adapter")
    return peft_type


def apply_adapter(model: nn.Module, peft_spec: Peft, adapter_path: str | Path | None = None) -> tuple[Any, str]:
    """Wrap the base model in a trainable peft adapter; returns (peft_model, a line saying what was built)."""
    from peft import get_peft_model

    if adapter_path is not None and saved_adapter_kind(adapter_path) != peft_spec.kind:
        raise ModelError(f"input.adapter_model.path: {adapter_path} holds a {saved_adapter_kind(adapter_path)} "
                         f"adapter but peft.{peft_spec.kind} is configured")
    encoder = native_prefix_encoder(model)
    if peft_spec.PREFIX_TUNING is not None and encoder is not None:
        return _apply_native_prefix(model, encoder, adapter_path)
    notes: list[str] = []
    if peft_spec.PREFIX_TUNING is None and adapter_path is not None:
        peft_model = _continue_peft(model, adapter_path, peft_spec.kind)
        notes.append(f"continuing from {adapter_path} with its own config")
    else:
        if peft_spec.PREFIX_TUNING is None:
            config, notes = peft_config(model, peft_spec)
        else:
            config = prefix_config(model, peft_spec.PREFIX_TUNING)
        try:
            peft_model = get_peft_model(model, config)
        except Exception as err:  # peft's types fail in their own ways (ValueError, KeyError, ImportError, ...)
            raise ModelError(f"peft.{peft_spec.kind}: cannot apply to {type(model).__name__}: "
                             f"{type(err).__name__}: {err}") from None
        if adapter_path is not None:
            _load_prefix_weights(peft_model, Path(adapter_path))
            notes.append(f"continuing from {adapter_path}")
    if peft_spec.PREFIX_TUNING is not None:
        use_chatglm_prefix(peft_model)
    _adapter_in_float32(peft_model)
    return peft_model, describe(peft_model, notes)


def _adapter_in_float32(model: nn.Module) -> None:
    """Whatever the base's dtype, the adapter trains in float32: 16-bit weights would round small updates away."""
    for _, param in _trainable(model):
        if param.dtype != torch.float32:
            param.data = param.data.float()


def load_saved_adapter(model: nn.Module, adapter_path: str | Path, *, trainable: bool = False) -> Any:
    """`PeftModel.from_pretrained`; a LoRA in ChatGLM's names (the reference's) is first renamed to fit a
    model converted from ChatGLM (`fedtune.model.chatglm`)."""
    from peft import PeftModel

    adapter = Path(adapter_path)
    if getattr(model.config, SOURCE_KEY, None) is not None and chatglm.in_original_names(adapter):
        with tempfile.TemporaryDirectory(prefix="fedtune-adapter-") as scratch:
            native = chatglm.native_lora(adapter, model.config, Path(scratch) / "native")
            return PeftModel.from_pretrained(model, str(native), is_trainable=trainable)
    return PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)


def _continue_peft(model: nn.Module, adapter_path: str | Path, kind: str) -> Any:
    try:
        return load_saved_adapter(model, adapter_path, trainable=True)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelError(f"input.adapter_model.path: {adapter_path}: cannot load the {kind} adapter: {err}") from None


def _load_prefix_weights(peft_model: Any, adapter_dir: Path) -> None:
    """Continue P-tuning from a saved adapter; its prefix encoder must match the configured one."""
    state = _saved_prefix_state(peft_model, adapter_dir)
    params = dict(_prefix_encoder(peft_model).named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise ModelError(f"{adapter_dir}: tensor `{REFERENCE_PREFIX}{_to_reference_key(unknown[0])}` is not part of "
                         "the configured prefix encoder (check peft.PREFIX_TUNING)")
    load_adapter_state(peft_model, {_encoder_param_name(peft_model, k): v for k, v in state.items()})


def _saved_prefix_state(peft_model: Any, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The raw encoder weights if saved, else peft's flattened prefix (which has no projection MLP)."""
    raw = adapter_dir / PREFIX_WEIGHTS
    if raw.is_file():
        return {_from_reference_key(k): v for k, v in _read_reference_prefix(raw).items()}
    from safetensors.torch import load_file

    flat = load_file(adapter_dir / "adapter_model.safetensors").get("prompt_embeddings")
    if flat is None or peft_model.active_peft_config.prefix_projection:
        raise ModelError(f"input.adapter_model.path: {adapter_dir}: no {PREFIX_WEIGHTS} with the prefix encoder's "
                         "weights (peft's own file cannot restore a prefix_projection encoder)")
    return {"embedding.weight": flat}


def _prefix_encoder(peft_model: Any) -> nn.Module:
    return peft_model.prompt_encoder[peft_model.active_adapter]


def _encoder_param_name(peft_model: Any, key: str) -> str:
    return f"prompt_encoder.{peft_model.active_adapter}.{key}"


# peft calls the projection MLP `transform`, ChatGLM-6B `trans`; the layer indices agree.
def _to_reference_key(key: str) -> str:
    return key.replace("transform.", "trans.", 1) if key.startswith("transform.") else key


def _from_reference_key(key: str) -> str:
    key = key[len(REFERENCE_PREFIX):]
    return key.replace("trans.", "transform.", 1) if key.startswith("trans.") else key


# --- P-tuning v2 through peft, as ChatGLM runs it ----------------------------------------


def use_chatglm_prefix(peft_model: Any) -> None:
    """Make peft's prefix tuning behave as ChatGLM2/3's P-tuning v2, in training and in generation.

    peft puts the prefix into the KV cache. Two things differ from ChatGLM, fixed by a pre-hook on
    the base model:
    - positions: ChatGLM numbers the tokens from 0, the prefix not counted (peft and transformers
      would start at `pre_seq_len`). With the same positions, a prefix trained here is the same
      function under ChatGLM's own code, which is what writing it back as
      `transformer.prefix_encoder.*` promises.
    - activation checkpointing: transformers drops the cache of checkpointed layers (the backward's
      replay would append to it twice), which would silently drop the prefix. In training the
      prefix is therefore handed over as a cache that is read and never written, which checkpointed
      layers may keep.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    base = peft_model.get_base_model()
    prefix_len = peft_model.active_peft_config.num_virtual_tokens
    for module in base.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module._can_checkpoint_with_cache = True  # safe: in training the cache is read-only (above)
    base.register_forward_pre_hook(_chatglm_prefix_hook(prefix_len), with_kwargs=True)


def _chatglm_prefix_hook(prefix_len: int) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        name = "cache" if kwargs.get("cache") is not None else "past_key_values"
        cache = kwargs.get(name)
        tokens = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if cache is None or tokens is None:
            return None
        if kwargs.get("position_ids") is None and not getattr(module.config, "position_encoding_2d", False):
            # (ChatGLM-6B derives its 2D positions from the tokens themselves, the prefix not counted)
            start = cache.get_seq_length() - prefix_len  # tokens already decoded; the prefix is not counted
            positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
            kwargs["position_ids"] = positions.unsqueeze(0).expand(tokens.shape[0], -1)
        if module.training:
            kwargs[name] = _read_only(cache)
        return args, kwargs

    return hook


def _read_only(cache: Any) -> Any:
    from transformers.cache_utils import Cache, DynamicLayer

    class PrefixLayer(DynamicLayer):
        """One layer's prefix: every update returns prefix + new states and stores nothing."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            super().__init__()
            self.lazy_initialization(keys, values)
            self.keys, self.values = keys, values

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    return Cache(layers=[PrefixLayer(layer.keys, layer.values) for layer in cache.layers])


# --- the model's own P-tuning v2 (ChatGLM) ------------------------------------------------


def native_prefix_overrides(folder: str | Path, peft_spec: Peft) -> dict[str, Any] | None:
    """ChatGLM's config settings for P-tuning v2, when the checkpoint's own code has a prefix encoder.

    ChatGLM-6B/2/3 declare `pre_seq_len` in their config; set, their code builds
    `transformer.prefix_encoder` and feeds its output to every layer's attention in its own
    layout. That is the reference's P-tuning and the one ChatGLM's attention understands, so
    it is used instead of peft's prefix tuning whenever the checkpoint offers it.
    """
    spec = peft_spec.PREFIX_TUNING
    folder = Path(folder)
    if spec is None:
        return None
    try:
        declared = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # load_base_model says what is wrong with it
    own = is_chatglm6b(declared)  # fedtune's ChatGLM-6B has upstream's prefix encoder
    if not own and (not has_remote_code(folder) or "pre_seq_len" not in declared
                    or declared.get("model_type") == "chatglm"):
        return None  # ChatGLM2/3 and GLM-4 folders become native models: peft's prefix, ChatGLM's conventions
    if spec.prefix_hidden_size is not None:
        raise ModelError("peft.PREFIX_TUNING.prefix_hidden_size: the prefix encoder of "
                         f"{folder} is the model's own and uses its hidden_size; remove the option")
    return {"pre_seq_len": spec.pre_seq_len, "prefix_projection": spec.prefix_projection}


def native_prefix_encoder(model: nn.Module) -> nn.Module | None:
    """`transformer.prefix_encoder` of a model that built its own (never of a peft model)."""
    if hasattr(model, "active_peft_config"):
        return None
    return getattr(getattr(model, "transformer", None), "prefix_encoder", None)


def _apply_native_prefix(model: nn.Module, encoder: nn.Module, adapter_path: str | Path | None) -> tuple[Any, str]:
    # The model's code freezes its base itself, but loading may hand back fresh trainable
    # parameters: only the prefix encoder may train and travel, never lm_head or the base.
    for param in model.parameters():
        param.requires_grad = False
    encoder.float()  # as ChatGLM's own P-tuning does: the prefix trains in float32
    for param in encoder.parameters():
        param.requires_grad = True
    notes = ["the model's own transformer.prefix_encoder"]
    if adapter_path is not None:
        _load_native_prefix(model, Path(adapter_path))
        notes.append(f"continuing from {adapter_path}")
    return model, describe(model, notes)


def _load_native_prefix(model: nn.Module, adapter_dir: Path) -> None:
    raw = adapter_dir / PREFIX_WEIGHTS
    if not raw.is_file():
        raise ModelError(f"input.adapter_model.path: {adapter_dir}: no {PREFIX_WEIGHTS} with prefix encoder weights")
    try:
        load_adapter_state(model, _read_reference_prefix(raw))  # the reference's keys are the model's own names
    except ModelError as err:
        raise ModelError(f"{raw}: {err} (check peft.PREFIX_TUNING.pre_seq_len and prefix_projection)") from None


def native_prefix_settings(model: nn.Module) -> dict[str, Any]:
    return {"pre_seq_len": model.config.pre_seq_len, "prefix_projection": bool(model.config.prefix_projection)}


def adapter_kind(model: Any) -> str:
    if native_prefix_encoder(model) is not None:
        return "PREFIX_TUNING"
    return str(getattr(model.active_peft_config.peft_type, "value", model.active_peft_config.peft_type))


def describe(model: Any, notes: Iterable[str] = ()) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    extra = f" ({'; '.join(notes)})" if notes else ""
    if native_prefix_encoder(model) is not None:
        settings = native_prefix_settings(model)
        projection = ", prefix_projection" if settings["prefix_projection"] else ""
        return f"P-tuning v2: pre_seq_len {settings['pre_seq_len']}{projection}{extra}; {trainable:,} trainable weights"
    config = model.active_peft_config
    kind = adapter_kind(model)
    targets = getattr(config, "target_modules", None)
    shown = ", ".join(sorted(targets)) if isinstance(targets, set | list | tuple) else str(targets)
    if kind == "LORA":
        what = f"LoRA r={config.r} alpha={config.lora_alpha:g} on {shown}"
    elif kind == "PREFIX_TUNING":
        projection = f", projection {config.encoder_hidden_size}" if config.prefix_projection else ""
        what = (f"P-tuning v2: {config.num_virtual_tokens} prefix tokens in each of {config.num_layers} layers"
                f"{projection}")
    elif kind == "ADALORA":
        what = f"AdaLoRA rank {config.init_r} -> {config.target_r} on {shown}"
    else:
        what = f"{kind} on {shown}" if targets is not None else kind
    return f"{what}{extra}; {trainable:,} trainable weights"


# --- adapter weights ----------------------------------------------------------------------


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The adapter's parameters, in registration order (the same on every party with the same config)."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached float32 CPU copies of exactly the trainable adapter weights."""
    return {name: p.detach().to(device="cpu", dtype=torch.float32, copy=True) for name, p in _trainable(model)}


def adapter_schema(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(p.shape)) for name, p in _trainable(model)]


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the adapter's parameters in place; every name and shape must match, checked first."""
    params = _trainable(model)
    names = {name for name, _ in params}
    missing = [name for name, _ in params if name not in state]
    if missing:
        raise ModelError(f"adapter tensor `{missing[0]}` is missing from the adapter state ({len(missing)} missing)")
    unknown = sorted(set(state) - names)
    if unknown:
        raise ModelError(f"adapter tensor `{unknown[0]}` is not part of this model's adapter")
    for name, p in params:
        if tuple(state[name].shape) != tuple(p.shape):
            raise ModelError(f"adapter tensor `{name}` has shape {tuple(state[name].shape)}, "
                             f"the model's is {tuple(p.shape)}")
    with torch.no_grad():
        for name, p in params:
            p.copy_(state[name].to(device=p.device, dtype=p.dtype))


# --- checkpoints --------------------------------------------------------------------------


def save_checkpoint(model: Any, dest_dir: str | Path) -> Path:
    """Write the adapter to `dest_dir` atomically: a temporary sibling folder, then a rename.

    An existing `dest_dir` is replaced whole: it is moved aside before the new one takes its
    name and deleted only afterwards, so at no point is a half-written checkpoint in its place.
    """
    dest = Path(dest_dir).resolve()
    with staged_dir(dest) as staging:
        if native_prefix_encoder(model) is not None:
            _save_native_prefix(model, staging)
        else:
            _save_peft(model, staging)
    return dest


def _save_native_prefix(model: Any, folder: Path) -> None:
    """The prefix encoder alone, under the model's own names (never the base: it is gigabytes and unchanged)."""
    encoder = native_prefix_encoder(model)
    assert encoder is not None
    _write_reference_prefix(encoder, folder / PREFIX_WEIGHTS)
    settings = {"peft_type": "PREFIX_TUNING", **native_prefix_settings(model)}
    (folder / NATIVE_PREFIX_CONFIG).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def _save_peft(model: Any, folder: Path) -> None:
    model.save_pretrained(str(folder))
    if adapter_kind(model) == "PREFIX_TUNING":  # also in the reference's layout (see the module docstring)
        _write_reference_prefix(_prefix_encoder(model), folder / PREFIX_WEIGHTS, rename=_to_reference_key)


def _write_reference_prefix(encoder: nn.Module, path: Path, rename: Callable[[str], str] = str) -> None:
    """The prefix encoder's weights under `transformer.prefix_encoder.*`: the file the reference's snippet loads."""
    raw = {f"{REFERENCE_PREFIX}{rename(k)}": v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    torch.save(raw, path)


def _read_reference_prefix(path: Path) -> dict[str, torch.Tensor]:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in saved.items() if k.startswith(REFERENCE_PREFIX)}
