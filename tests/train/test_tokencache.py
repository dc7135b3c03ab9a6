"""The token cache: the fresh samples, keyed by file, tokenizer and settings, never trusted blindly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.model.tiny import build_tokenizer, corpus_characters
from fedtune.spec import Dataset, TrainsetEntry
from fedtune.train import tokencache
from fedtune.train.data import DataError, load_qa, tokenize_qa
from fedtune.train.tokencache import decode, encode, load_features, tokenizer_fingerprint
from support.jobs import POEMS, write_share

DATASET = Dataset(max_src_length=32, max_dst_length=24)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(corpus_characters([POEMS]))


def entries(*paths: Path) -> list[TrainsetEntry]:
    return [TrainsetEntry(path=str(p)) for p in paths]


def cached_entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.npz"))


def test_cached_samples_are_the_fresh_ones_and_are_read_back(tmp_path: Path, tokenizer, monkeypatch) -> None:
    files = [write_share(tmp_path, part, 9) for part in range(3)]
    fresh = tokenize_qa(load_qa(entries(*files), tmp_path, DATASET), tokenizer, DATASET)
    cache = tmp_path / "cache"
    assert load_features(entries(*files), tmp_path, DATASET, tokenizer, cache_dir=cache) == fresh
    assert len(cached_entries(cache)) == 3  # one entry per file

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenised again although cached")

    monkeypatch.setattr(tokencache, "tokenize_qa", no_tokenizing)
    assert load_features(entries(*files), tmp_path, DATASET, tokenizer, cache_dir=cache) == fresh
    assert b"instruction" not in cached_entries(cache)[0].read_bytes()  # ids only, no text


def test_a_changed_file_setting_or_tokenizer_is_another_entry(tmp_path: Path, tokenizer) -> None:
    path = write_share(tmp_path, 0, 5)
    cache = tmp_path / "cache"
    first = load_features(entries(path), tmp_path, DATASET, tokenizer, cache_dir=cache)
    load_features(entries(path), tmp_path, Dataset(max_src_length=8, max_dst_length=24), tokenizer, cache_dir=cache)
    other_tokenizer = build_tokenizer([*corpus_characters([POEMS]), "☃"])
    assert tokenizer_fingerprint(other_tokenizer) != tokenizer_fingerprint(tokenizer)
    load_features(entries(path), tmp_path, DATASET, other_tokenizer, cache_dir=cache)
    document = json.loads(path.read_text(encoding="utf-8"))
    document["instances"][0]["output"] = "春眠不觉晓"
    path.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    changed = load_features(entries(path), tmp_path, DATASET, tokenizer, cache_dir=cache)
    assert len(cached_entries(cache)) == 4
    assert changed[0] != first[0] and changed[1:] == first[1:]


def test_a_damaged_entry_is_ignored_and_rewritten(tmp_path: Path, tokenizer) -> None:
    path = write_share(tmp_path, 1, 4)
    cache = tmp_path / "cache"
    fresh = load_features(entries(path), tmp_path, DATASET, tokenizer, cache_dir=cache)
    (entry,) = cached_entries(cache)
    good = entry.read_bytes()
    entry.write_bytes(good[: len(good) // 2])
    assert load_features(entries(path), tmp_path, DATASET, tokenizer, cache_dir=cache) == fresh
    assert entry.read_bytes() == good


def test_decode_refuses_what_encode_cannot_have_written(tokenizer) -> None:
    sample = {"input_ids": [2, 9, 9, 3], "attention_mask": [1] * 4, "labels": [-100, -100, 9, 3]}
    assert decode(encode([sample]), len(tokenizer)) == [sample]
    assert decode(encode([sample]), 5) is None  # ids beyond the vocabulary
    assert decode(b"not an archive", len(tokenizer)) is None
    all_prompt = {"input_ids": [2, 9], "attention_mask": [1, 1], "labels": [-100, -100]}
    assert decode(encode([all_prompt]), len(tokenizer)) is None


def test_an_unwritable_cache_only_means_no_cache(tmp_path: Path, tokenizer) -> None:
    path = write_share(tmp_path, 2, 3)
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the cache folder would go")
    expected = tokenize_qa(load_qa(entries(path), tmp_path, DATASET), tokenizer, DATASET)
    assert load_features(entries(path), tmp_path, DATASET, tokenizer, cache_dir=blocker / "cache") == expected


def test_bad_data_is_still_named(tmp_path: Path, tokenizer) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"instruction": "x"}', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json: missing key `instances`"):
        load_features(entries(bad), tmp_path, DATASET, tokenizer, cache_dir=tmp_path / "cache")
    empty = tmp_path / "empty.json"
    empty.write_text('{"instruction": "x", "instances": []}', encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.json: the dataset has no instances"):
        load_features(entries(empty), tmp_path, DATASET, tokenizer, cache_dir=tmp_path / "cache")
