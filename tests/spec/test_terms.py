"""The terms that protect a party: one digest, every term in it, local fields out of it."""

from __future__ import annotations

import copy

import pytest
import yaml

from fedtune.spec import SpecError, parse_job
from fedtune.spec.terms import TermsRefused, differences, digest, refusal, terms
from support.jobs import EXAMPLE

PIN = "sha256:" + "ab" * 32


@pytest.fixture
def doc() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def changed(doc: dict, edit) -> dict:
    other = copy.deepcopy(doc)
    edit(other["spec"])
    return other


TERM_EDITS = {
    "encryption.otp": lambda s: s.update(encryption={"otp": {}}),
    "privacy.dp": lambda s: s.update(privacy={"dp": {"clip_norm": 1.0, "noise_multiplier": 0.5}}),
    "aggregation.agg_steps": lambda s: s["aggregation"].update(agg_steps=0.5),
    "aggregation.weighting": lambda s: s["aggregation"].update(weighting="uniform"),
    "trainer.num_train_epochs": lambda s: s["trainer"].update(num_train_epochs=5),
    "peft.LORA.r": lambda s: s["peft"]["LORA"].update(r=2),
    "parties.node-9.role": lambda s: s["parties"].append({"name": "node-9", "role": "label_trainer",
                                                          "trainset": [{"path": "x.json"}]}),
    "parties.node-1.identity": lambda s: s["parties"][1].update(identity=PIN),
    "job": None,  # metadata.name
}


@pytest.mark.parametrize("field", sorted(TERM_EDITS))
def test_each_term_changes_the_digest_and_is_named_with_both_values(doc: dict, field: str) -> None:
    if field == "job":
        other = copy.deepcopy(doc)
        other["metadata"]["name"] = "another-job"
    else:
        other = changed(doc, TERM_EDITS[field])
    mine, theirs = parse_job(doc), parse_job(other)
    assert digest(mine) != digest(theirs)
    found = differences(terms(mine), terms(theirs))
    named = [line for line in found if line.startswith((f"{field}:", f"{field}."))]
    assert named, found
    assert all(", theirs " in line and ": mine " in line for line in named)


def test_local_fields_leave_the_digest_alone(doc: dict) -> None:
    def local(spec: dict) -> None:
        spec["parties"][1]["trainset"] = [{"type": "QA", "path": "elsewhere/mine.json"}]
        spec["parties"][1]["trainer"] = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 3}
        spec["parties"][1]["resources"] = {"gpu": 1, "memory": "8Gi"}
        spec["parties"][2]["address"] = "10.0.0.2:55006"
        spec["input"]["pretrained_model"] = {"path": "/models/local-copy"}
        spec["aggregation"]["round_timeout_s"] = 60
        spec["tls"] = {"revoked": [PIN]}
        spec["runPolicy"] = {"activeDeadlineSeconds": 99}
        spec["backoffLimit"] = 7
    assert digest(parse_job(doc)) == digest(parse_job(changed(doc, local)))


def test_digest_is_canonical_sha256(doc: dict) -> None:
    value = digest(parse_job(doc))
    assert value.startswith("sha256:") and len(value) == 71
    reordered = changed(doc, lambda s: s["parties"].reverse())  # the parties' order is not a term
    assert digest(parse_job(reordered)) == value


def test_refusal_names_every_difference(doc: dict) -> None:
    host = changed(doc, lambda s: (s.update(encryption={"plain": {}}), s["peft"]["LORA"].update(r=4)))
    mine = changed(doc, lambda s: s.update(encryption={"otp": {}}))
    err = refusal("the scheduler", terms(parse_job(mine)), terms(parse_job(host)))
    assert isinstance(err, TermsRefused) and not isinstance(err, ValueError)
    text = str(err)
    assert "encryption.otp.key_bitlength: mine 64, theirs absent" in text
    assert "encryption.plain: mine absent, theirs {}" in text
    assert "peft.LORA.r: mine 8, theirs 4" in text


@pytest.mark.parametrize("bad", ["sha256:xyz", "md5:" + "ab" * 32, "ab" * 32, "sha256:" + "ab" * 31])
def test_a_pin_that_does_not_parse_is_refused_naming_the_field(doc: dict, bad: str) -> None:
    doc["spec"]["parties"][1]["identity"] = bad
    with pytest.raises(SpecError, match=r"job.yaml: spec\.parties\[1\]\.identity: .*not an identity"):
        parse_job(doc, "job.yaml")
    doc["spec"]["parties"][1].pop("identity")
    doc["spec"]["tls"] = {"revoked": [bad]}
    with pytest.raises(SpecError, match=r"job.yaml: spec\.tls\.revoked.*not an identity"):
        parse_job(doc, "job.yaml")
