"""ChatGLM2 / ChatGLM3 / GLM-4 remote-code checkpoints as transformers' native GLM, and back for adapters.

These checkpoints (config `model_type: chatglm`) carry their own modelling code, which transformers 5
no longer runs. Their weights map one-to-one onto `GlmForCausalLM`:

| ChatGLM (`transformer.` ...)                      | native GLM                                     |
| ------------------------------------------------- | ---------------------------------------------- |
| `embedding.word_embeddings`                       | `model.embed_tokens`                           |
| `encoder.layers.N.self_attention.query_key_value` | `model.layers.N.self_attn.{q,k,v}_proj` (split) |
| `encoder.layers.N.self_attention.dense`           | `model.layers.N.self_attn.o_proj`              |
| `encoder.layers.N.mlp.dense_h_to_4h`              | `model.layers.N.mlp.gate_up_proj`              |
| `encoder.layers.N.mlp.dense_4h_to_h`              | `model.layers.N.mlp.down_proj`                 |
| `encoder.layers.N.{input,post_attention}_layernorm` | the same names under `model.layers.N`        |
| `encoder.final_layernorm`, `output_layer`         | `model.norm`, `lm_head`                        |

`query_key_value` splits into rows of heads·head_dim (q) and groups·head_dim (k, v). Both rotate the
first half of each head's dimensions in interleaved pairs (partial rotary factor 0.5) with base
10000·`rope_ratio`. Nothing here runs the checkpoint's code: config.json, the weights and
tokenizer.model are read as data. A converted model's config records where it came from
(`fedtune_source`). Adapters trained on it can be written back in ChatGLM's own names (`export_adapter`).

ChatGLM-6B (v1: GLM-130B-style 2D positions, another layer layout) has an implementation of its own:
`fedtune.model.chatglm6b`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedtune.files import staged_dir
from fedtune.model.folders import (
    ModelError,
    check_convertible,
    checkpoint_files,
    is_chatglm,
    read_config,
    rope_ratio_scales_positions,
    version,
)
from fedtune.model.names import ADAPTER_FILES, PREFIX_WEIGHTS, SOURCE_KEY

ROPE_BASE = 10000.0

# Whole-model tensors and per-layer ones (under `transformer.encoder.layers.N.` / `model.layers.N.`).
TOP_NAMES = {
    "transformer.embedding.word_embeddings": "model.embed_tokens",
    "transformer.encoder.final_layernorm": "model.norm",
    "transformer.output_layer": "lm_head",
}
LAYER_NAMES = {
    "input_layernorm": "input_layernorm",
    "post_attention_layernorm": "post_attention_layernorm",
    "self_attention.dense": "self_attn.o_proj",
    "mlp.dense_h_to_4h": "mlp.gate_up_proj",
    "mlp.dense_4h_to_h": "mlp.down_proj",
}
QKV = "self_attention.query_key_value"
QKV_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
ORIGINAL_LAYER = re.compile(r"^transformer\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
IGNORED = re.compile(r"^transformer\.rotary_pos_emb\.inv_freq$")  # recomputed from the config

# ChatGLM's specials follow the sentencepiece vocabulary, in this order (ChatGLM3 adds the roles).
SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")


# --- config -------------------------------------------------------------------------------


def native_config(config: dict[str, Any], folder: Path) -> Any:
    """The `GlmConfig` of a ChatGLM2/3 / GLM-4 config (checked first)."""
    from transformers import GlmConfig

    check_convertible(config, folder)
    heads = int(config["num_attention_heads"])
    groups = int(config.get("multi_query_group_num", heads)) if config.get("multi_query_attention") else heads
    native = GlmConfig(
        vocab_size=int(config["padded_vocab_size"]),
        hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config["ffn_hidden_size"]),
        num_hidden_layers=int(config["num_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=groups,
        head_dim=int(config["kv_channels"]),
        max_position_embeddings=int(config.get("seq_length", 8192)),
        rms_norm_eps=float(config.get("layernorm_epsilon", 1e-5)),
        attention_bias=bool(config.get("add_qkv_bias", False)),
        rope_parameters=_rope(config, folder),
        tie_word_embeddings=False,
        pad_token_id=config.get("pad_token_id", 0),
        eos_token_id=config.get("eos_token_id", 2),
        bos_token_id=config.get("bos_token_id"),
        dtype=config.get("torch_dtype"),
        **{SOURCE_KEY: {"format": "chatglm", "version": version(config)}},
    )
    native.architectures = ["GlmForCausalLM"]
    return native


def _rope(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    ratio = float(config.get("rope_ratio", 1))
    if rope_ratio_scales_positions(config, folder):  # ChatGLM2-6B-32k: positions / ratio, as linear scaling does
        return {"rope_type": "linear", "factor": ratio, "partial_rotary_factor": 0.5, "rope_theta": ROPE_BASE}
    return {"rope_type": "default", "partial_rotary_factor": 0.5, "rope_theta": ROPE_BASE * ratio}


# --- weights ------------------------------------------------------------------------------


def read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    yield name, handle.get_tensor(name)
        else:
            yield from torch.load(path, map_location="cpu", weights_only=True, mmap=True).items()
    except (OSError, RuntimeError, ValueError) as err:
        raise ModelError(f"{path}: unreadable weights: {err}") from None


def _qkv_rows(config: Any) -> list[int]:
    kv = config.num_key_value_heads * config.head_dim
    return [config.num_attention_heads * config.head_dim, kv, kv]


def native_tensors(name: str, tensor: torch.Tensor, config: Any) -> list[tuple[str, torch.Tensor]]:
    """The native tensors one ChatGLM tensor becomes (none for what the config recomputes)."""
    if IGNORED.match(name):
        return []
    module, _, kind = name.rpartition(".")
    if module in TOP_NAMES:
        return [(f"{TOP_NAMES[module]}.{kind}", tensor)]
    layer = ORIGINAL_LAYER.match(name)
    if layer is not None:
        index, inner, kind = layer.groups()
        prefix = f"model.layers.{index}."
        if inner == QKV:
            parts = tensor.split(_qkv_rows(config), dim=0)
            return [(f"{prefix}{part}.{kind}", t) for part, t in zip(QKV_PARTS, parts)]
        if inner in LAYER_NAMES:
            return [(f"{prefix}{LAYER_NAMES[inner]}.{kind}", tensor)]
    raise ModelError(f"tensor `{name}` is not part of a ChatGLM2/ChatGLM3/GLM-4 checkpoint")


def load_native(folder: Path, dtype: torch.dtype) -> nn.Module:
    """`GlmForCausalLM` from a ChatGLM folder, shard by shard into a model built without memory (meta device)."""
    from transformers import GlmForCausalLM

    config = native_config(read_config(folder), folder)
    with torch.device("meta"):
        model = GlmForCausalLM(config)
    expected = set(model.state_dict())
    loaded: set[str] = set()
    for shard in checkpoint_files(folder):
        state = {}
        for name, tensor in read_tensors(shard):
            try:
                converted = native_tensors(name, tensor, config)
            except ModelError as err:
                raise ModelError(f"{shard}: {err}") from None
            for native_name, native in converted:
                state[native_name] = native.to(dtype).contiguous()
        _check_shapes(model, state, shard)
        model.load_state_dict(state, strict=False, assign=True)
        loaded.update(state)
    missing = sorted(expected - loaded)
    if missing:
        raise ModelError(f"{folder}: the checkpoint lacks {missing[0]} ({len(missing)} tensors missing)")
    # Buffers the config recomputes (rotary frequencies) were built on the meta device: build them for real.
    model.model.rotary_emb = type(model.model.rotary_emb)(config)
    return model.eval()


def _check_shapes(model: nn.Module, state: dict[str, torch.Tensor], shard: Path) -> None:
    own = model.state_dict()
    for name, tensor in state.items():
        if tuple(own[name].shape) != tuple(tensor.shape):
            raise ModelError(f"{shard}: `{name}` has shape {tuple(tensor.shape)}, config.json implies "
                             f"{tuple(own[name].shape)}")


def convert_folder(src: Path, dst: Path) -> Path:
    """`fedtune convert`: a native folder (safetensors, config, fast tokenizer) that loads with no remote code."""
    config = read_config(src)
    if not is_chatglm(config):
        raise ModelError(f"{src}: model_type {config.get('model_type')!r} is not a ChatGLM remote-code folder: "
                         "nothing to convert")
    dtype = getattr(torch, str(config.get("torch_dtype", "float32")), torch.float32)
    model = load_native(src, dtype)
    tokenizer = load_tokenizer(src)
    with staged_dir(dst.resolve()) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return dst


# --- tokenizer ----------------------------------------------------------------------------


def load_tokenizer(folder: Path) -> Any:
    """The folder's `tokenizer.model` as a fast tokenizer giving the ids ChatGLM's own tokenizer code gives.

    That code (`tokenization_chatglm.py`) fails on transformers 5; what it does is plain. ChatGLM2/3:
    sentencepiece's ids, the specials right after its vocabulary, `[gMASK] sop` before every text.
    GLM-4: tiktoken's byte-level BPE (the file holds base64 tokens and their ranks) with its split
    pattern, the specials of tokenizer_config.json, `[gMASK] <sop>` before every text.
    """
    path = folder / "tokenizer.model"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"{folder}: no tokenizer.model (ChatGLM's tokenizer)") from None
    ranks = _tiktoken_ranks(data)
    if ranks is not None:
        return _glm4_tokenizer(folder, ranks)
    return _sentencepiece_tokenizer(folder, data)


def _with_prefix(core: Any, specials: list[str], prefix: tuple[str, str], first_id: int, source: Path,
                 **tokens: str) -> Any:
    """A fast tokenizer of `core` whose specials take the ids from `first_id` on, putting `prefix` before texts."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, clean_up_tokenization_spaces=False, **tokens)
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in specials if t not in tokens.values()]})
    ids = tokenizer.convert_tokens_to_ids(specials)
    if ids != list(range(first_id, first_id + len(specials))):
        raise ModelError(f"{source}: its special tokens do not follow its {first_id} ordinary ones as ChatGLM's do")
    pair = tokenizer.convert_tokens_to_ids(list(prefix))
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{prefix[0]} {prefix[1]} $A", pair=f"{prefix[0]} {prefix[1]} $A $B",
        special_tokens=list(zip(prefix, pair)))
    return tokenizer


def _sentencepiece_tokenizer(folder: Path, data: bytes) -> Any:
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    path = folder / "tokenizer.model"
    proto = import_protobuf().ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as err:  # protobuf's DecodeError
        raise ModelError(f"{path}: neither a sentencepiece model nor a tiktoken file "
                         f"({type(err).__name__}: {err})") from None
    pieces = [p.piece for p in proto.pieces]
    bpe = proto.trainer_spec.model_type == 2
    vocab: Any = {p: i for i, p in enumerate(pieces)} if bpe else [(p.piece, p.score) for p in proto.pieces]
    core = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    if core is None:
        raise ModelError(f"{path}: sentencepiece model type {proto.trainer_spec.model_type} is neither BPE nor Unigram")
    specials = list(SPECIALS) + (list(ROLES) if _has_roles(folder) else [])
    unk = proto.trainer_spec.unk_piece
    return _with_prefix(core, specials, ("[gMASK]", "sop"), len(pieces), path, unk_token=unk,
                        eos_token=pieces[proto.trainer_spec.eos_id], pad_token=unk)


def _has_roles(folder: Path) -> bool:
    """ChatGLM3 (not ChatGLM2) has the role tokens; its tokenizer code names them."""
    code = folder / "tokenization_chatglm.py"
    return code.is_file() and "<|user|>" in code.read_text(encoding="utf-8", errors="replace")


def _tiktoken_ranks(data: bytes) -> dict[bytes, int] | None:
    """`base64-token rank` lines (GLM-4's tokenizer.model), or None for anything else."""
    import base64
    import binascii

    ranks: dict[bytes, int] = {}
    try:
        for line in data.decode("ascii").splitlines():
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (UnicodeDecodeError, ValueError, binascii.Error):
        return None
    return ranks or None


GLM4_SPECIALS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                 "<|end_of_video|>")
# GLM-4's split pattern (its tokenization_chatglm.py), the one transformers' tiktoken converter uses too.
GLM4_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{"""
                r"""1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def _glm4_tokenizer(folder: Path, ranks: dict[bytes, int]) -> Any:
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class FromRanks(TikTokenConverter):
        load_tiktoken_bpe = staticmethod(lambda _: ranks)  # read above, without the tiktoken package

    core = FromRanks(vocab_file=str(folder / "tokenizer.model"), pattern=GLM4_PATTERN).converted()
    specials = _configured_specials(folder, len(ranks)) or list(GLM4_SPECIALS)
    return _with_prefix(core, specials, ("[gMASK]", "<sop>"), len(ranks), folder / "tokenizer.model",
                        eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _configured_specials(folder: Path, first_id: int) -> list[str]:
    """The added tokens tokenizer_config.json lists from `first_id` on, in id order."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return []
    added = config.get("added_tokens_decoder") or {}
    by_id = {int(i): entry.get("content") for i, entry in added.items() if isinstance(entry, dict)}
    return [by_id[i] for i in sorted(by_id) if i >= first_id and by_id[i]]


# --- adapters back in ChatGLM's names -----------------------------------------------------


_NATIVE_LORA = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(.+)\.(lora_[AB])\.weight$")
_ORIGINAL_LORA = re.compile(r"^base_model\.model\.transformer\.encoder\.layers\.(\d+)\.(.+)\.(lora_[AB])\.weight$")


def _adapter_weights(adapter: Path) -> Path | None:
    return next((adapter / name for name in ADAPTER_FILES if (adapter / name).is_file()), None)


def in_original_names(adapter: Path) -> bool:
    """Whether a saved LoRA names ChatGLM's modules (the reference's adapters, or `export_adapter`'s): one
    tensor's name says it, as an adapter's tensors all follow one model's names."""
    weights = _adapter_weights(adapter)
    first = next(read_tensors(weights), None) if weights is not None else None
    return first is not None and _ORIGINAL_LORA.match(first[0]) is not None


def native_lora(adapter: Path, config: Any, dst: Path) -> Path:
    """A LoRA saved in ChatGLM's names, written to `dst` in the converted model's names (`config`: its config).

    The fused `query_key_value`'s LoRA (B·A) becomes one on each of q, k and v with the same A and that
    part's rows of B: the same update, whether B is dense (trained on ChatGLM) or block diagonal (exported
    from here). The other modules are renamed; rank and alpha stay, so the scaling does too.
    """
    from safetensors.torch import save_file

    config_path = adapter / "adapter_config.json"
    settings = json.loads(config_path.read_text(encoding="utf-8"))
    if settings.get("peft_type") != "LORA":
        raise ModelError(f"{config_path}: only a LoRA in ChatGLM's names can be converted")
    weights = _adapter_weights(adapter)
    if weights is None:
        raise ModelError(f"{adapter}: no {' or '.join(ADAPTER_FILES)}")
    native: dict[str, torch.Tensor] = {}
    for name, tensor in read_tensors(weights):
        match = _ORIGINAL_LORA.match(name)
        if match is None or (match.group(2) != QKV and match.group(2) not in LAYER_NAMES):
            raise ModelError(f"{weights}: tensor `{name}` is not a LoRA weight of a ChatGLM layer")
        index, module, ab = match.groups()
        prefix = f"base_model.model.model.layers.{index}."
        if module != QKV:
            native[f"{prefix}{LAYER_NAMES[module]}.{ab}.weight"] = tensor
            continue
        parts = [tensor.clone() for _ in QKV_PARTS] if ab == "lora_A" else tensor.split(_qkv_rows(config), dim=0)
        for part, t in zip(QKV_PARTS, parts):
            native[f"{prefix}{part}.{ab}.weight"] = t.contiguous()
    patterns = {key: {new: value for old, value in (settings.get(key) or {}).items() for new in _native_modules(old)}
                for key in ("rank_pattern", "alpha_pattern")}
    # The targets are the modules the weights name (the saved list may be dotted paths or a regex).
    targets = sorted({name.removesuffix(".lora_A.weight").rsplit(".", 1)[-1] for name in native if "lora_A" in name})
    settings.update(target_modules=targets, base_model_name_or_path=None, **patterns)
    with staged_dir(dst.resolve()) as staging:
        save_file(native, str(staging / "adapter_model.safetensors"))
        (staging / "adapter_config.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    return dst


def export_adapter(checkpoint: Path, dst: Path) -> Path:
    """A checkpoint trained on a converted model, in ChatGLM's parameter names, for the reference's snippet.

    LoRA: adapters on q/k/v become one LoRA on `query_key_value` of rank 3r (A stacked, B block
    diagonal: the same update); o_proj, gate_up_proj, down_proj are renamed. P-tuning: the checkpoint's
    `pytorch_model.bin` already holds `transformer.prefix_encoder.*` in ChatGLM's layout.
    """
    from safetensors.torch import load_file, save_file

    config_path = checkpoint / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"{checkpoint}: not an adapter checkpoint ({config_path.name}: {err})") from None
    with staged_dir(dst.resolve()) as staging:
        if config.get("peft_type") == "PREFIX_TUNING":
            _export_prefix(checkpoint, config, staging)
        elif config.get("peft_type") == "LORA":
            state = load_file(str(checkpoint / "adapter_model.safetensors"))
            original, config = _original_lora(state, config, config_path)
            save_file(original, str(staging / "adapter_model.safetensors"))
            (staging / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        else:
            raise ModelError(f"{config_path}: peft_type {config.get('peft_type')!r} is neither LORA nor PREFIX_TUNING")
    return dst


def _export_prefix(checkpoint: Path, config: dict[str, Any], staging: Path) -> None:
    if config.get("prefix_projection"):
        raise ModelError(f"{checkpoint}: a prefix_projection encoder differs in shape from ChatGLM2/3's own; only "
                         "prefixes trained with prefix_projection false load into ChatGLM's code")
    raw = checkpoint / PREFIX_WEIGHTS
    if not raw.is_file():
        raise ModelError(f"{checkpoint}: no {PREFIX_WEIGHTS} with the prefix encoder")
    (staging / PREFIX_WEIGHTS).write_bytes(raw.read_bytes())
    settings = {"pre_seq_len": config["num_virtual_tokens"], "prefix_projection": False}
    (staging / "prefix_config.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def _native_modules(name: str) -> list[str]:
    """The converted model's module names for one of ChatGLM's, as peft's patterns name modules: a path
    (`transformer.encoder.layers.N.self_attention.query_key_value`), a path within a layer, or a leaf."""
    path = name.removeprefix("base_model.model.")
    layer = re.match(r"^transformer\.encoder\.layers\.(\d+)\.(.+)$", path)
    prefix, inner = (f"model.layers.{layer.group(1)}.", layer.group(2)) if layer else ("", path)
    if inner == QKV:
        return [prefix + part for part in QKV_PARTS]
    if inner in LAYER_NAMES:
        return [prefix + LAYER_NAMES[inner]]
    leaves = {QKV.rsplit(".", 1)[-1]: [p.rsplit(".", 1)[-1] for p in QKV_PARTS],
              **{k.rsplit(".", 1)[-1]: [v.rsplit(".", 1)[-1]] for k, v in LAYER_NAMES.items()}}
    if not layer and inner in leaves:
        return leaves[inner]
    raise ModelError(f"`{name}` in the adapter's rank_pattern or alpha_pattern is not a module of a ChatGLM layer")


def _original_lora(state: dict[str, torch.Tensor], config: dict[str, Any],
                   source: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save"):
        if config.get(key):
            raise ModelError(f"{source}: {key} cannot be written in ChatGLM's names")
    if config.get("use_dora") or config.get("bias", "none") != "none":
        raise ModelError(f"{source}: only plain LoRA (no DoRA, bias none) can be written in ChatGLM's names")
    layers: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for name, tensor in state.items():
        match = _NATIVE_LORA.match(name)
        if match is None:
            raise ModelError(f"{source.parent}: tensor `{name}` is not a LoRA weight of a native GLM layer")
        index, module, ab = match.groups()
        layers.setdefault(int(index), {}).setdefault(module, {})[ab] = tensor
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    original: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for index, modules in sorted(layers.items()):
        prefix = f"base_model.model.transformer.encoder.layers.{index}."
        qkv = [part for part in QKV_PARTS if part in modules]
        if qkv and len(qkv) < len(QKV_PARTS):
            raise ModelError(f"{source}: LoRA on {', '.join(qkv)} but not all of q, k, v: ChatGLM fuses them into "
                             "query_key_value, so train on all three (target_modules: [query_key_value])")
        if qkv:
            a, b = _fused_qkv([modules[part] for part in QKV_PARTS], rank)
            original[f"{prefix}{QKV}.lora_A.weight"], original[f"{prefix}{QKV}.lora_B.weight"] = a, b
            targets.add("query_key_value")
        for module, weights in modules.items():
            if module in QKV_PARTS:
                continue
            name = next((o for o, n in LAYER_NAMES.items() if n == module), None)
            if name is None or not module.endswith("proj"):
                raise ModelError(f"{source.parent}: LoRA on `{module}` has no ChatGLM counterpart")
            for ab, tensor in weights.items():
                original[f"{prefix}{name}.{ab}.weight"] = tensor
            targets.add(name.rsplit(".", 1)[-1])
    fused = {"r": 3 * rank,  # the same alpha / r (or alpha / sqrt r) as each of q, k, v had
             "lora_alpha": alpha * (math.sqrt(3) if config.get("use_rslora") else 3)}
    config = {**config, "target_modules": sorted(targets), "base_model_name_or_path": None}
    if targets == {"query_key_value"}:
        config.update(fused)
    elif "query_key_value" in targets:
        config.update(rank_pattern={"query_key_value": fused["r"]},
                      alpha_pattern={"query_key_value": fused["lora_alpha"]})
    return original, config


def _fused_qkv(parts: list[dict[str, torch.Tensor]], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA for the fused projection: A stacks the parts' A, B places each part's B in its rows and columns."""
    a = torch.cat([part["lora_A"] for part in parts], dim=0)
    b = torch.block_diag(*[part["lora_B"] for part in parts])
    assert b.shape[1] == rank * len(parts)
    return a, b
