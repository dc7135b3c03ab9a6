"""The job spec: the reference's keys with their meaning, and errors that name the field."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from fedtune.spec import (
    SpecError,
    aggregation_steps,
    checkpoint_name,
    expand_output_path,
    load_job,
    parse_job,
)
from support.jobs import EXAMPLE


@pytest.fixture
def doc() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def error_of(doc: dict) -> str:
    with pytest.raises(SpecError) as info:
        parse_job(doc, "job.yaml")
    return str(info.value)


def test_example_parses_with_reference_meaning() -> None:
    job = load_job(EXAMPLE)
    spec = job.spec
    assert spec.peft.kind == "LORA" and spec.peft.LORA is not None
    assert spec.peft.LORA.target_modules == ["query_key_value"]
    assert spec.encryption.scheme == "plain"
    assert spec.fractions() == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert [checkpoint_name(f) for f in spec.fractions()][-1] == "checkpoint-1"
    assert spec.assist_trainer.name == "assist_trainer"
    assert [p.name for p in spec.label_trainers] == ["node-1", "node-2"]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["spec"]["aggregation"].update(agg_steps=0), "spec.aggregation.agg_steps"),
        (lambda d: d["spec"]["aggregation"].update(agg_steps=1.5), "spec.aggregation.agg_steps"),
        (lambda d: d["spec"].update(peft={}), "spec.peft"),
        (lambda d: d["spec"].update(encryption={"otp": {"key_bitlength": 32}}), "spec.encryption.otp.key_bitlength"),
        (lambda d: d["spec"]["dataset"].update(prompt_pattern="{}"), "spec.dataset.prompt_pattern"),
        (lambda d: d["spec"]["parties"][1].pop("trainset"), "label_trainer `node-1` has no trainset"),
        (lambda d: d["spec"]["parties"][1].update(role="assist_trainer"), "exactly one party"),
        (lambda d: d["spec"]["parties"][1].update(trainer={"learning_rate": 1}), "spec.parties[1].trainer"),
        (lambda d: d["spec"]["trainer"].update(save_steps=3), "save_steps"),
        (lambda d: d["spec"].pop("input"), "spec.input"),
        (lambda d: d["spec"]["parties"][2].update(name="node-1"), "name the same party"),
        (lambda d: d["spec"]["parties"][1].update(ranks=0), "spec.parties[1].ranks"),
        (lambda d: d["spec"]["parties"][1].update(ranks=4, resources={"gpu": 2}),
         "`node-1` has ranks 4 but resources.gpu gives it 2 GPUs"),
        (lambda d: (d["spec"]["parties"][0].pop("trainset"), d["spec"]["parties"][0].update(ranks=2)),
         "`assist_trainer` has ranks 2 but no trainset"),
        (lambda d: d["spec"].update(encryption={"secagg_plus": {"threshold": 3}}),
         "encryption.secagg_plus.threshold: 3 is more than the 2 label_trainers"),
        (lambda d: d["spec"].update(encryption={"secagg_plus": {"threshold": 1}}),
         "encryption.secagg_plus.threshold: 1 is not above (n + max_colluders)/2 = 1 for 2 label_trainers and "
         "0 colluders (at least 2)"),
        (lambda d: d["spec"].update(encryption={"secagg_plus": {"max_colluders": 1, "threshold": 1}}),
         "encryption.secagg_plus.threshold: 1 is not above (n + max_colluders)/2 = 1.5 for 2 label_trainers and "
         "1 colluders (at least 2)"),
        (lambda d: d["spec"].update(encryption={"otp": {"max_colluders": 2}}),
         "encryption.otp.max_colluders: 2 of the 2 label_trainers would leave no honest one"),
        (lambda d: d["spec"].update(privacy={"dp": {"clip_norm": 1, "noise_multiplier": 1}},
                                    aggregation={"weighting": "samples"}),
         "aggregation.weighting: privacy.dp needs `uniform` weights"),
        (lambda d: d["spec"].update(encryption={"secagg_plus": {"dropout_timeout_s": 0}}),
         "spec.encryption.secagg_plus.dropout_timeout_s"),
        (lambda d: d["spec"].update(encryption={"otp": {}, "secagg_plus": {}}), "exactly one of `plain`, `otp` or"),
        (lambda d: d["spec"].update(privacy={"dp": {"clip_norm": 0, "noise_multiplier": 1}}),
         "spec.privacy.dp.clip_norm: Input should be greater than 0"),
        (lambda d: d["spec"].update(privacy={"dp": {"clip_norm": 1, "noise_multiplier": -0.5}}),
         "spec.privacy.dp.noise_multiplier: Input should be greater than or equal to 0"),
        (lambda d: d["spec"].update(privacy={"dp": {"clip_norm": 1, "noise_multiplier": 1, "delta": 1}}),
         "spec.privacy.dp.delta"),
    ],
)
def test_bad_spec_names_the_field(doc: dict, mutate, expected: str) -> None:
    bad = copy.deepcopy(doc)
    mutate(bad)
    message = error_of(bad)
    assert message.startswith("job.yaml: ")
    assert expected in message


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read job file"):
        load_job(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed\n")
    with pytest.raises(SpecError, match=r"bad\.yaml: not valid YAML"):
        load_job(bad)


def test_aggregation_steps_align_and_refuse_collisions() -> None:
    assert aggregation_steps([0.2, 0.4, 0.6, 0.8, 1.0], 10) == [2, 4, 6, 8, 10]
    assert aggregation_steps([0.3, 0.6, 0.9, 1.0], 20) == [6, 12, 18, 20]
    with pytest.raises(SpecError, match=r"agg_steps is too small.*0\.4 and 0\.6.*step 2 of 3"):
        aggregation_steps([0.2, 0.4, 0.6, 0.8, 1.0], 3)


def test_ranks_come_from_ranks_or_gpus(doc: dict) -> None:
    parties = doc["spec"]["parties"]
    parties[1].update(resources={"gpu": 2})
    parties[2].update(ranks=3)
    spec = parse_job(doc).spec
    assert [spec.ranks(p) for p in spec.parties] == [1, 2, 3]
    assert [spec.ranks_field(p) for p in spec.parties[1:]] == ["spec.parties[1].resources.gpu", "spec.parties[2].ranks"]


def test_output_placeholders() -> None:
    assert expand_output_path("/opt/checkpoints/[JOB_ID]/[NODE_ID]", "j1", "node-1") == "/opt/checkpoints/j1/node-1"


def test_a_single_label_trainer_trains_alone(doc) -> None:
    alone = copy.deepcopy(doc)
    alone["spec"]["parties"] = [doc["spec"]["parties"][1]]
    spec = parse_job(alone).spec
    assert spec.standalone and spec.assist_trainer is None and spec.authority.name == "node-1"
    assert not parse_job(doc).spec.standalone and parse_job(doc).spec.authority.name == "assist_trainer"
    only = copy.deepcopy(doc)
    only["spec"]["parties"] = doc["spec"]["parties"][1:]
    assert "exactly one party must have role `assist_trainer` (or a single label_trainer trains alone)" in (
        error_of(only))
    alone["spec"]["privacy"] = {"dp": {"clip_norm": 1.0, "noise_multiplier": 1.0}}
    assert "privacy.dp: a single label_trainer training alone shares no update" in error_of(alone)
    only["spec"]["parties"] = doc["spec"]["parties"][:1]
    assert "at least one party must have role `label_trainer`" in error_of(only)
