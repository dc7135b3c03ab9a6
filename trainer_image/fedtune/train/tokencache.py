"""Tokenised datasets, cached per file: a dataset file is tokenised once, not again at every run and rank.

An entry is keyed by everything that decides the tokens: the file's bytes (SHA-256), the
tokenizer (its full serialised definition, or its files, plus the library versions), the
`dataset` settings that shape a sample and the version of the tokenisation rule (`FORMAT`,
raised whenever `fedtune.train.data.tokenize_item` changes). A changed file, tokenizer or setting
is simply another key. Entries hold token ids only (no text), are written to a temporary
name and renamed, and are read without pickle; one that does not decode is ignored and
rewritten. The folder is `$FEDTUNE_CACHE_DIR`, else `$XDG_CACHE_HOME/fedtune/tokenized`
(`~/.cache/...`): never beside a job's keys or certificates. When it cannot be written the
run goes on uncached and says so once.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedtune.files import write_atomic
from fedtune.roles import CACHE_DIR_ENV
from fedtune.spec import Dataset, TrainsetEntry
from fedtune.train.data import IGNORE_INDEX, DataError, dataset_files, load_file, tokenize_qa

log = logging.getLogger(__name__)

FORMAT = 1  # the tokenisation rule's version: raise it when tokenize_item changes what it makes
_TOKENIZER_FILES_SKIPPED = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")

Features = list[dict[str, list[int]]]


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fedtune" / "tokenized"


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """What identifies the tokenizer's behaviour; None when it cannot be told (then nothing is cached)."""
    import tokenizers
    import transformers

    digest = hashlib.sha256()
    for part in (type(tokenizer).__name__, transformers.__version__, tokenizers.__version__,
                 tokenizer.eos_token_id, len(tokenizer)):
        digest.update(f"{part}\n".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a fast tokenizer: its whole definition (vocabulary, merges, pre/post-processing)
        digest.update(backend.to_str().encode())
        return digest.hexdigest()
    folder = Path(str(getattr(tokenizer, "name_or_path", "")))
    if not folder.is_dir():
        return None
    for path in sorted(folder.iterdir()):  # a slow tokenizer: its files (vocabulary, code, settings)
        if path.is_file() and not path.name.endswith(_TOKENIZER_FILES_SKIPPED):
            digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def cache_key(content: bytes, tokenizer_id: str, dataset_spec: Dataset) -> str:
    settings = dataset_spec.model_dump(include={"max_src_length", "max_dst_length", "prompt_pattern",
                                                "key_query", "key_answer"})
    digest = hashlib.sha256(f"fedtune tokens {FORMAT}\n{tokenizer_id}\n".encode())
    digest.update(json.dumps(settings, sort_keys=True).encode() + b"\n")
    digest.update(hashlib.sha256(content).digest())
    return digest.hexdigest()


def encode(features: Features) -> bytes:
    """Samples as three int arrays: the ids one after another, each sample's length and its prompt length."""
    lengths = [len(f["input_ids"]) for f in features]
    prompts = [sum(1 for label in f["labels"] if label == IGNORE_INDEX) for f in features]
    ids = [token for f in features for token in f["input_ids"]]
    buffer = io.BytesIO()
    np.savez(buffer, ids=np.asarray(ids, dtype=np.int64), lengths=np.asarray(lengths, dtype=np.int64),
             prompts=np.asarray(prompts, dtype=np.int64))
    return buffer.getvalue()


def decode(blob: bytes, vocab_size: int) -> Features | None:
    """The samples `encode` wrote; None for anything that is not exactly such an entry."""
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as arrays:
            ids, lengths, prompts = (arrays[k].tolist() for k in ("ids", "lengths", "prompts"))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if (len(lengths) != len(prompts) or sum(lengths) != len(ids) or any(not 0 <= i < vocab_size for i in ids)
            or any(not 0 < p < n for p, n in zip(prompts, lengths))):
        return None
    features: Features = []
    start = 0
    for length, prompt in zip(lengths, prompts):
        sample = ids[start:start + length]
        features.append({"input_ids": sample, "attention_mask": [1] * length,
                         "labels": [IGNORE_INDEX] * prompt + sample[prompt:]})
        start += length
    return features


class TokenCache:
    def __init__(self, folder: Path | None, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.tokenizer_id = tokenizer_fingerprint(tokenizer) if folder is not None else None
        self.folder = folder if self.tokenizer_id is not None else None
        if folder is not None and self.folder is None:
            log.info("tokenised data is not cached: the tokenizer cannot be identified by its files")

    def features(self, path: Path, dataset_spec: Dataset) -> Features:
        """One QA file's samples: from the cache when this exact file was tokenised this way before."""
        if self.folder is None:
            return tokenize_qa(load_file(path, dataset_spec), self.tokenizer, dataset_spec)
        try:
            content = path.read_bytes()
        except OSError as err:
            raise DataError(f"{path}: cannot read: {err.strerror}") from None
        entry = self.folder / f"{cache_key(content, self.tokenizer_id or '', dataset_spec)}.npz"
        if entry.is_file():
            cached = decode(entry.read_bytes(), len(self.tokenizer))
            if cached is not None:
                log.info("%s: %d samples from the token cache", path, len(cached))
                return cached
        features = tokenize_qa(load_file(path, dataset_spec), self.tokenizer, dataset_spec)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(entry, encode(features))
        except OSError as err:
            log.info("tokenised data is not cached: cannot write %s (%s)", self.folder, err.strerror)
            self.folder = None
        return features


def load_features(entries: Sequence[TrainsetEntry], base_dir: Path, dataset_spec: Dataset, tokenizer: Any, *,
                  cache_dir: Path | None = None) -> Features:
    """Every sample of every entry, tokenised (`fedtune.train.data`'s rule), in `load_qa`'s order."""
    files = dataset_files(entries, base_dir)
    cache = TokenCache(cache_dir, tokenizer)
    features = [sample for path in files for sample in cache.features(path, dataset_spec)]
    if not features:
        raise DataError(f"{', '.join(str(p) for p in files) or 'trainset'}: the dataset has no instances")
    return features
