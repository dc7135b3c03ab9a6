"""The reference's QA json: loading, the tokenization rule, padding, and every kind of bad data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.model.tiny import build_tokenizer, corpus_characters
from fedtune.spec import Dataset, TrainsetEntry
from fedtune.train.data import DataError, QAItem, collator_for, load_qa, tokenize_item, tokenize_qa
from support.jobs import POEMS


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(corpus_characters([POEMS]))


def write(path: Path, document: object) -> Path:
    path.write_text(document if isinstance(document, str) else json.dumps(document, ensure_ascii=False),
                    encoding="utf-8")
    return path


def entries(*paths: Path) -> list[TrainsetEntry]:
    return [TrainsetEntry(path=str(p)) for p in paths]


# --- the tokenization rule, worked by hand -------------------------------------------------


def test_tokenization_matches_the_reference_rule_by_hand(tokenizer) -> None:
    item = QAItem(instruction="写诗", query="春", answer="春眠不觉晓", source="x.json", index=0)
    spec = Dataset(max_src_length=8, max_dst_length=3)
    # prompt "写诗：\n问：春\n答：" is <bos> + 11 characters; the first 8 tokens survive.
    ids = tokenizer.convert_tokens_to_ids
    src = [tokenizer.bos_token_id, *ids(["写", "诗", "：", "\n", "问", "：", "春"])]
    dst = ids(["春", "眠", "不"])
    eos = tokenizer.eos_token_id
    assert tokenize_item(item, tokenizer, spec) == {
        "input_ids": [*src, *dst, eos],
        "attention_mask": [1] * 12,
        "labels": [-100] * 8 + [*dst, eos],
    }


class SuffixSpecials:
    """A ChatGLM-6B-like tokenizer: one id per character, `[gMASK] <sop>` (ids 1, 2) appended."""

    eos_token_id = 3
    pad_token_id = 0

    def __call__(self, text: str, *, add_special_tokens: bool = True) -> dict:
        ids = [10 + ord(c) % 1000 for c in text]
        return {"input_ids": [*ids, 1, 2] if add_special_tokens else ids}


def test_truncation_keeps_specials_that_come_last() -> None:
    item = QAItem(instruction="写诗", query="春", answer="晓", source="x.json", index=0)
    sample = tokenize_item(item, SuffixSpecials(), Dataset(max_src_length=5))
    text_ids = SuffixSpecials()("写诗：", add_special_tokens=False)["input_ids"]
    assert sample["input_ids"][:5] == [*text_ids, 1, 2]  # three characters, then [gMASK] <sop>
    assert sample["labels"] == [-100] * 5 + [10 + ord("晓") % 1000, 3]


def test_untruncated_sample_holds_the_whole_prompt_and_answer(tokenizer) -> None:
    item = QAItem("写诗", "春", "春眠", "x.json", 0)
    sample = tokenize_item(item, tokenizer, Dataset())
    prompt_len = 1 + len("写诗：\n问：春\n答：")
    assert len(sample["input_ids"]) == prompt_len + 2 + 1
    assert tokenizer.decode(sample["input_ids"], skip_special_tokens=True) == "写诗：\n问：春\n答：春眠"
    assert sample["labels"][:prompt_len] == [-100] * prompt_len
    assert sample["labels"][prompt_len:] == sample["input_ids"][prompt_len:]


def test_collator_pads_right_with_pad_id_and_ignored_labels(tokenizer) -> None:
    items = [QAItem("写诗", "春", "春眠不觉晓", "x.json", 0), QAItem("写诗", "月", "明", "x.json", 1)]
    features = tokenize_qa(items, tokenizer, Dataset())
    batch = collator_for(tokenizer)(features)
    short, long_ = len(features[1]["input_ids"]), len(features[0]["input_ids"])
    assert batch["input_ids"].shape == (2, long_)
    assert batch["input_ids"][1, short:].tolist() == [tokenizer.pad_token_id] * (long_ - short)
    assert batch["labels"][1, short:].tolist() == [-100] * (long_ - short)
    assert batch["attention_mask"][1].tolist() == [1] * short + [0] * (long_ - short)


def test_custom_keys_and_pattern(tmp_path: Path, tokenizer) -> None:
    path = write(tmp_path / "d.json", {"instruction": "答", "instances": [{"q": "一", "a": "二"}]})
    spec = Dataset(key_query="q", key_answer="a", prompt_pattern="[{}]{}=")
    (item,) = load_qa(entries(path), tmp_path, spec)
    sample = tokenize_item(item, tokenizer, spec)
    assert tokenizer.decode(sample["input_ids"], skip_special_tokens=True) == "[答]一=二"


# --- the bundled dataset -------------------------------------------------------------------


def test_bundled_poems_load_in_three_unequal_parts(tokenizer) -> None:
    spec = Dataset(max_src_length=64, max_dst_length=64)
    sizes = [len(load_qa(entries(POEMS / f"part-{i}.json"), POEMS, spec)) for i in range(3)]
    assert len(set(sizes)) == 3 and all(60 <= n <= 110 for n in sizes)
    everything = load_qa(entries(POEMS), POEMS, spec)  # a folder: its *.json files in name order
    assert len(everything) == sum(sizes) and everything[0].source.endswith("part-0.json")
    for item in everything:
        answer = tokenizer(item.answer, add_special_tokens=False)["input_ids"]
        assert len(answer) <= 64 and tokenizer.unk_token_id not in answer
        assert tokenizer.decode(answer) == item.answer  # Chinese round-trips through the tokenizer


# --- bad data: every message names the file ------------------------------------------------


def test_malformed_json_names_file_line_and_column(tmp_path: Path) -> None:
    text = '{\n  "instruction": "x",\n  "instances": [\n    {"input": "a" "output": "b"}\n]}'
    path = write(tmp_path / "bad.json", text)
    with pytest.raises(DataError, match=r"bad\.json: malformed JSON: .*line 4, column 19"):
        load_qa(entries(path), tmp_path, Dataset())


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"instruction": "x"}, r"missing key `instances`"),
        ({"instances": []}, r"missing key `instruction`"),
        ({"instruction": "x", "instances": {"input": "a"}}, r"`instances` must be a list"),
        ([1, 2], r"expected a JSON object"),
        ({"instruction": "x", "instances": ["a"]}, r"instances\[0\]: expected an object"),
        ({"instruction": "x", "instances": [{"input": "a", "output": "b"}, {"output": "b"}]},
         r"instances\[1\]: missing key `input` \(dataset.key_query\)"),
        ({"instruction": "x", "instances": [{"input": "a"}]},
         r"instances\[0\]: missing key `output` \(dataset.key_answer\)"),
        ({"instruction": "x", "instances": [{"input": 3, "output": "b"}]},
         r"`input` \(dataset.key_query\) must be a string"),
    ],
)
def test_bad_documents_name_the_file(tmp_path: Path, document: object, expected: str) -> None:
    path = write(tmp_path / "data.json", document)
    with pytest.raises(DataError, match=rf"{tmp_path}/data\.json: .*{expected}"):
        load_qa(entries(path), tmp_path, Dataset())


def test_missing_configured_key_names_that_key(tmp_path: Path) -> None:
    path = write(tmp_path / "d.json", {"instruction": "x", "instances": [{"input": "a", "output": "b"}]})
    with pytest.raises(DataError, match=r"d\.json: instances\[0\]: missing key `question` \(dataset.key_query\)"):
        load_qa(entries(path), tmp_path, Dataset(key_query="question"))


def test_empty_dataset_names_the_files(tmp_path: Path) -> None:
    path = write(tmp_path / "empty.json", {"instruction": "x", "instances": []})
    with pytest.raises(DataError, match=r"empty\.json: the dataset has no instances"):
        load_qa(entries(path), tmp_path, Dataset())


def test_missing_path_and_empty_folder_and_non_utf8(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"trainset\[0\]\.path: .*nope\.json: no such file or folder"):
        load_qa([TrainsetEntry(path="nope.json")], tmp_path, Dataset())
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"folder: folder has no \*\.json files"):
        load_qa(entries(tmp_path / "folder"), tmp_path, Dataset())
    (tmp_path / "latin1.json").write_bytes('{"instruction": "é"}'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.json: not UTF-8"):
        load_qa(entries(tmp_path / "latin1.json"), tmp_path, Dataset())


def test_relative_paths_resolve_against_the_base_dir(tmp_path: Path) -> None:
    write(tmp_path / "d.json", {"instruction": "x", "instances": [{"input": "a", "output": "b"}]})
    (item,) = load_qa([TrainsetEntry(path="d.json")], tmp_path, Dataset())
    assert (item.query, item.answer, item.index) == ("a", "b", 0)
