"""The CRD is generated from fedtune.spec: committed files match, and the schema is structural."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from fedtune_operator import crdgen


def _walk(node: Any, path: str = ""):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return crdgen.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def spec_field(schema: dict[str, Any], dotted: str) -> dict[str, Any]:
    node = schema["properties"]["spec"]
    for part in dotted.split("."):
        node = node["items"] if part == "[]" else node["properties"][part]
    return node


@pytest.mark.parametrize("path", crdgen.CRD_PATHS, ids=lambda p: str(p.relative_to(crdgen.REPO_ROOT)))
def test_committed_crd_is_the_generated_one(path) -> None:
    assert path.read_text(encoding="utf-8") == crdgen.render(), (
        f"{path} is stale: run `python -m fedtune_operator.crdgen --write`"
    )


def test_check_mode_agrees() -> None:
    assert crdgen.main(["--check"]) == 0


def test_names_columns_and_status_subresource() -> None:
    crd = crdgen.crd()
    assert crd["metadata"]["name"] == "federatedfinetunes.fedtune.io"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == ("FederatedFineTune", "federatedfinetunes", ["fft"])
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Phase": ".status.phase",
        "Round": ".status.round",
        "Loss": ".status.loss",
        "Age": ".metadata.creationTimestamp",
    }


def test_schema_is_structural(schema) -> None:
    """No construct that kube-apiserver refuses in a structural schema."""
    for path, node in _walk(schema):
        assert "$ref" not in node and "$defs" not in node, path
        assert "anyOf" not in node and "oneOf" not in node and "allOf" not in node, path
        assert node.get("additionalProperties") is not False, path
        assert "default" not in node and "title" not in node and "const" not in node, path
        if "properties" in node and path.split(".")[-1] != "properties":
            assert node.get("type") == "object", path
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            if bound in node:
                assert node[bound] is True, path


def test_ranges_and_enums_come_from_the_model(schema) -> None:
    agg = spec_field(schema, "aggregation.agg_steps")
    assert agg == {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1}
    dh = spec_field(schema, "encryption.otp.key_exchange.key_bitlength")
    assert dh["type"] == "integer" and dh["enum"] == [2048, 3072, 4096, 6144, 8192]
    assert spec_field(schema, "encryption.otp.key_bitlength")["enum"] == [64, 128]
    assert spec_field(schema, "parties.[].role")["enum"] == ["assist_trainer", "label_trainer"]
    dropout = spec_field(schema, "peft.LORA.lora_dropout")
    assert dropout["minimum"] == 0 and dropout["maximum"] == 1 and dropout["exclusiveMaximum"] is True
    assert spec_field(schema, "parties.[].resources.gpu")["minimum"] == 0
    assert spec_field(schema, "backoffLimit") == {"type": "integer", "minimum": 0}
    assert spec_field(schema, "parties")["minItems"] == 1  # one label_trainer may train alone


def test_required_and_nullable(schema) -> None:
    assert schema["required"] == ["spec"]
    assert schema["properties"]["spec"]["required"] == ["input", "peft", "parties"]
    assert spec_field(schema, "parties.[]")["required"] == ["name", "role"]
    assert spec_field(schema, "peft.LORA")["nullable"] is True
    assert spec_field(schema, "parties.[].remote")["nullable"] is True


def test_extra_keys_only_where_the_model_allows_them(schema) -> None:
    for dotted in ("peft.LORA", "trainer", "encryption.plain"):
        assert spec_field(schema, dotted)["x-kubernetes-preserve-unknown-fields"] is True, dotted
    for dotted in ("aggregation", "peft.PREFIX_TUNING", "parties.[]", "dataset", "storage.output"):
        assert "x-kubernetes-preserve-unknown-fields" not in spec_field(schema, dotted), dotted
    # `list[str] | str` has no structural type: accepted here, checked by the operator.
    assert spec_field(schema, "peft.LORA.target_modules") == {"x-kubernetes-preserve-unknown-fields": True}


def test_cross_field_rules_are_cel(schema) -> None:
    rules = {r["rule"] for r in spec_field(schema, "peft")["x-kubernetes-validations"]}
    assert "has(self.LORA) != has(self.PREFIX_TUNING)" in rules
    spec_rules = [r["rule"] for r in schema["properties"]["spec"]["x-kubernetes-validations"]]
    assert "self == oldSelf" in spec_rules
    assert any("assist_trainer" in r for r in spec_rules)
    assert schema["properties"]["metadata"]["properties"]["name"]["pattern"].startswith("^[a-z0-9]")


def test_rendered_yaml_has_no_anchors() -> None:
    text = crdgen.render()
    assert "&id" not in text and "*id" not in text
    assert yaml.safe_load(text) == crdgen.crd()
