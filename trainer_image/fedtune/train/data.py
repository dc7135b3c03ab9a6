"""The reference's QA dataset: json files of `{"instruction": ..., "instances": [{query, answer}, ...]}`.

A trainset entry points to one such file or to a folder of them (`*.json`, sorted by name so every
run sees the same order). Each instance becomes one training sample:

    prompt  = dataset.prompt_pattern.format(instruction, instance[dataset.key_query])
    src     = tokens(prompt)[:max_src_length]            (with the tokenizer's own special tokens,
                                                          which truncation never cuts off)
    dst     = tokens(answer)[:max_dst_length]            (no special tokens)
    input   = src + dst + [eos]
    labels  = [-100] * len(src) + dst + [eos]            (only the answer is learned)

Every problem with the data raises `DataError` naming the file (and the instance and key).
Reading and checking the files needs no torch (`fedtune validate` runs them in a blink).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fedtune.spec import Dataset, TrainsetEntry, resolve_path

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100  # label value the causal-LM loss skips


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file (and the instance / key)."""


@dataclass(frozen=True)
class QAItem:
    instruction: str
    query: str
    answer: str
    source: str  # the file it came from, for messages
    index: int  # position in that file's `instances`


class _Tokenizer(Protocol):
    eos_token_id: int | None
    pad_token_id: int | None

    def __call__(self, text: str, *, add_special_tokens: bool = ...) -> Any: ...


# --- loading ------------------------------------------------------------------------------


def build_prompt(instruction: str, query: str, dataset_spec: Dataset) -> str:
    """The reference's prompt: `prompt_pattern.format(instruction, query)`."""
    return dataset_spec.prompt_pattern.format(instruction, query)


def dataset_files(entries: Sequence[TrainsetEntry], base_dir: Path, field: str = "trainset") -> list[Path]:
    """The json files the entries name: a file as is, a folder as its `*.json` files in name order."""
    files: list[Path] = []
    for i, entry in enumerate(entries):
        path = resolve_path(entry.path, base_dir)
        where = f"{field}[{i}].path: {path}"
        if path.is_dir():
            found = sorted(p for p in path.glob("*.json") if p.is_file())
            if not found:
                raise DataError(f"{where}: folder has no *.json files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{where}: no such file or folder")
    return files


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None


def _string_field(obj: dict[str, Any], key: str, where: str, what: str) -> str:
    if key not in obj:
        raise DataError(f"{where}: missing key `{key}` ({what})")
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: `{key}` ({what}) must be a string, got {type(value).__name__}")
    return value


def _read_document(path: Path) -> tuple[dict[str, Any], str]:
    """A QA file's JSON object and its instruction."""
    document = _read_json(path)
    if not isinstance(document, dict):
        raise DataError(f"{path}: expected a JSON object with `instruction` and `instances`, "
                        f"got {type(document).__name__}")
    return document, _string_field(document, "instruction", str(path), "the task instruction")


def read_instruction(path: Path) -> str:
    """The task instruction of one QA file (what `fedtune chat --job` puts before each query)."""
    return _read_document(path)[1]


def load_file(path: Path, dataset_spec: Dataset) -> list[QAItem]:
    """One QA json file; an empty `instances` list is allowed here (the whole trainset may not be empty)."""
    document, instruction = _read_document(path)
    if "instances" not in document:
        raise DataError(f"{path}: missing key `instances` (the list of QA pairs)")
    instances = document["instances"]
    if not isinstance(instances, list):
        raise DataError(f"{path}: `instances` must be a list, got {type(instances).__name__}")
    items = []
    for index, instance in enumerate(instances):
        where = f"{path}: instances[{index}]"
        if not isinstance(instance, dict):
            raise DataError(f"{where}: expected an object, got {type(instance).__name__}")
        query = _string_field(instance, dataset_spec.key_query, where, "dataset.key_query")
        answer = _string_field(instance, dataset_spec.key_answer, where, "dataset.key_answer")
        items.append(QAItem(instruction, query, answer, str(path), index))
    return items


def load_qa(entries: Sequence[TrainsetEntry], base_dir: Path, dataset_spec: Dataset) -> list[QAItem]:
    """All instances of all entries, in a stable order (entries in order, folder files sorted)."""
    files = dataset_files(entries, base_dir)
    items = [item for path in files for item in load_file(path, dataset_spec)]
    if not items:
        raise DataError(f"{', '.join(str(p) for p in files) or 'trainset'}: the dataset has no instances")
    return items


# --- tokenization -------------------------------------------------------------------------


def _ids(tokenizer: _Tokenizer, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def truncate_keeping_specials(tokenizer: _Tokenizer, text: str, limit: int) -> list[int]:
    """`text` with the tokenizer's special tokens, at most `limit` tokens, cutting the text, not the specials.

    GLM-4 / ChatGLM2-3 tokenizers (and the tiny one) put their specials first, where this is simply
    the first `limit` tokens; ChatGLM-6B puts `[gMASK] <sop>` last, which a plain cut would drop.
    """
    full = _ids(tokenizer, text, special=True)
    if len(full) <= limit:
        return full
    content = _ids(tokenizer, text, special=False)
    extra = len(full) - len(content)
    start = next((i for i in range(extra + 1) if full[i : i + len(content)] == content), None)
    if start is None or extra >= limit:  # specials interleaved with the text: no clean split
        return full[:limit]
    return full[:start] + content[: limit - extra] + full[start + len(content) :]


def tokenize_item(item: QAItem, tokenizer: _Tokenizer, dataset_spec: Dataset) -> dict[str, list[int]]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token: cannot mark where answers end")
    prompt = build_prompt(item.instruction, item.query, dataset_spec)
    src = truncate_keeping_specials(tokenizer, prompt, dataset_spec.max_src_length)
    dst = _ids(tokenizer, item.answer, special=False)[: dataset_spec.max_dst_length]
    input_ids = [*src, *dst, eos]
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": [IGNORE_INDEX] * len(src) + [*dst, eos],
    }


def tokenize_qa(items: Sequence[QAItem], tokenizer: _Tokenizer, dataset_spec: Dataset) -> list[dict[str, list[int]]]:
    return [tokenize_item(item, tokenizer, dataset_spec) for item in items]


class FeatureDataset:
    """Tokenized samples as a map-style dataset (Trainer needs `__len__` to plan its steps)."""

    def __init__(self, features: Sequence[dict[str, list[int]]]) -> None:
        self.features = list(features)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.features[index]


@dataclass
class QACollator:
    """Right-pads a batch to its longest sample: `pad_id` for inputs, -100 for labels, 0 for the mask."""

    pad_id: int

    def __call__(self, batch: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        import torch

        width = max(len(sample["input_ids"]) for sample in batch)

        def pad(key: str, value: int) -> torch.Tensor:
            return torch.tensor([s[key] + [value] * (width - len(s[key])) for s in batch], dtype=torch.long)

        return {
            "input_ids": pad("input_ids", self.pad_id),
            "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", IGNORE_INDEX),
        }


@dataclass
class PackedCollator:
    """A batch as one row without padding (`dataset.packing`): the samples one after another.

    Position ids restart at 0 with each sample and there is no attention mask: transformers'
    attention then lets each token see only the earlier tokens of its own sample. A sample's
    first label is ignored, so no sample learns to predict the next one.
    """

    def __call__(self, batch: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        import torch

        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for sample in batch:
            ids += sample["input_ids"]
            labels += [IGNORE_INDEX, *sample["labels"][1:]]
            positions += range(len(sample["input_ids"]))
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([positions])}


def collator_for(tokenizer: _Tokenizer, *, packing: bool = False) -> QACollator | PackedCollator:
    """Pads with the tokenizer's pad token, or EOS when it has none (padding is masked out anyway)."""
    if packing:
        return PackedCollator()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a PAD nor an EOS token to pad batches with")
    return QACollator(pad_id=pad)


def check_packing(model: torch.nn.Module) -> None:
    """Refuse `dataset.packing` unless the model keeps the samples of a packed row apart.

    Tried, not assumed: two short samples packed into one row must give the second sample the
    outputs it has alone. Models that ignore restarting position ids (their own remote code,
    peft's prefix tuning, whose cache switches transformers' packed masks off) fail this.
    """
    import torch

    first, second = [4, 5, 6, 7], [8, 9, 10]
    packed = PackedCollator()([{"input_ids": first, "labels": first}, {"input_ids": second, "labels": second}])
    alone = PackedCollator()([{"input_ids": second, "labels": second}])
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            together = model(input_ids=packed["input_ids"].to(device), position_ids=packed["position_ids"].to(device),
                             use_cache=False).logits[0, len(first):]
            apart = model(input_ids=alone["input_ids"].to(device), position_ids=alone["position_ids"].to(device),
                          use_cache=False).logits[0]
        tolerance = 1e-3 if together.dtype == torch.float32 else 5e-2
        kept_apart = bool(torch.allclose(together.float(), apart.float(), atol=tolerance, rtol=tolerance))
    except (TypeError, ValueError, RuntimeError) as err:
        raise DataError(f"dataset.packing: {type(model).__name__} cannot take packed rows ({err}); "
                        "set dataset.packing to false") from None
    finally:
        model.train(training)
    if not kept_apart:
        raise DataError(f"dataset.packing: the attention of {type(model).__name__} (as adapted here) does not keep "
                        "the samples of a packed row apart (it ignores restarting position ids); "
                        "set dataset.packing to false")
