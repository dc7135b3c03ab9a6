"""A tiny GLM-architecture model and a character-level tokenizer trained on local data.

Tests, the demo and the benchmark need a real transformers GLM (`GlmForCausalLM`, or
`Glm4ForCausalLM`) without downloading anything: this builds one with random weights, sized
to a tokenizer whose vocabulary is every character of the given QA json files (plus ASCII and
common CJK punctuation, so prompts and answers round-trip).

Then (`pretrain_steps`, 200 by default; 0 keeps the random weights) the whole model trains
briefly as a plain language model on the texts of the data (no prompts), standing in for a real
pretrained base: adapters on a random-weight model barely move the loss (P-tuning not at all),
since the frozen random layers dominate it. It takes a few seconds for the default size.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from fedtune.files import staged_dir
from fedtune.spec import Dataset

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIALS = (PAD, UNK, BOS, EOS)  # ids 0..3, in this order
# Characters every prompt may use even when the data lacks them: the default prompt pattern,
# ASCII and the usual full-width punctuation.
_ALWAYS = Dataset().prompt_pattern + string.printable + "，。、；：？！“”‘’（）《》【】…—·「」『』"


def _strings(value: Any, *, keys: bool = True) -> Iterator[str]:
    """Every string inside a json value (keys too, by default: a custom key_query may hold any text)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            if keys:
                yield key
            yield from _strings(item, keys=keys)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item, keys=keys)


def _json_files(paths: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(path.rglob("*.json")))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such data file or folder")
    if not files:
        raise ValueError(f"no *.json data in {', '.join(str(p) for p in paths)}")
    return files


def corpus_texts(data_paths: Iterable[str | Path]) -> list[str]:
    """The string values of the data files, in file order."""
    return [text for path in _json_files(data_paths)
            for text in _strings(json.loads(path.read_text(encoding="utf-8")), keys=False)]


def corpus_characters(data_paths: Iterable[str | Path]) -> list[str]:
    """The sorted character set of the data (sorted so the same data always gives the same ids)."""
    chars = set(_ALWAYS)
    for path in _json_files(data_paths):
        for text in _strings(json.loads(path.read_text(encoding="utf-8"))):
            chars.update(text)
    return sorted(chars)


def build_tokenizer(chars: Sequence[str]) -> PreTrainedTokenizerFast:
    """One token per character; `<bos>` is prepended to every encoded text, as GLM tokenizers add their prefix."""
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *(c for c in chars if c not in SPECIALS)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # `[\s\S]` (not `.`) so that newlines in the prompt pattern are tokens too.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        clean_up_tokenization_spaces=False, model_max_length=4096,
    )


def build_config(
    vocab_size: int, *, hidden_size: int, num_layers: int, heads: int, kv_heads: int,
    kind: Literal["glm", "glm4"], intermediate_size: int | None = None, max_positions: int = 1024,
) -> Any:
    from transformers import Glm4Config, GlmConfig

    if hidden_size % heads or heads % kv_heads:
        raise ValueError(f"hidden_size {hidden_size} must split into {heads} heads, and heads into {kv_heads} kv heads")
    config_cls = {"glm": GlmConfig, "glm4": Glm4Config}[kind]
    return config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden_size // heads,  # GlmConfig defaults to 128, which a small model must not use
        max_position_embeddings=max_positions,
        pad_token_id=SPECIALS.index(PAD),
        bos_token_id=SPECIALS.index(BOS),
        eos_token_id=SPECIALS.index(EOS),
        tie_word_embeddings=False,
    )


def build_tiny_model(
    out_dir: str | Path,
    data_paths: Sequence[str | Path],
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int | None = None,
    seed: int = 0,
    kind: Literal["glm", "glm4"] = "glm",
    pretrain_steps: int = 200,
    vocab_size: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Build, save (safetensors) and return `out_dir`; written to a temporary folder, then renamed.

    The same arguments and data always give the same weights. An existing `out_dir` is refused
    unless `overwrite`; then the new model replaces it whole. `vocab_size` gives the model a real
    checkpoint's vocabulary width (ChatGLM-6B: 130,528) beyond the tokenizer's characters, so that
    the output projection costs what it costs there.
    """
    from transformers import Glm4ForCausalLM, GlmForCausalLM

    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass overwrite to replace it)")
    tokenizer = build_tokenizer(corpus_characters(data_paths))
    if vocab_size is not None and vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    config = build_config(vocab_size or len(tokenizer), hidden_size=hidden_size, num_layers=num_layers, heads=heads,
                          kv_heads=kv_heads, kind=kind, intermediate_size=intermediate_size)
    model_cls = {"glm": GlmForCausalLM, "glm4": Glm4ForCausalLM}[kind]
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = model_cls(config)
        if pretrain_steps > 0:
            pretrain(model, tokenizer, corpus_texts(data_paths), steps=pretrain_steps)
    with staged_dir(out) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return out



def pretrain(model: Any, tokenizer: Any, texts: Sequence[str], *, steps: int, batch: int = 8, length: int = 64,
             lr: float = 3e-3) -> float:
    """Plain next-character training on random windows of the texts; returns the last loss."""
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor(stream)
    length = min(length, len(ids) - 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - length, (batch,)).tolist()
        windows = torch.stack([ids[s : s + length] for s in starts])
        loss = model(input_ids=windows, labels=windows).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return loss.item()
