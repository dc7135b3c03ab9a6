"""The CRD is generated from fedtune.spec: committed files match, and the schema is structural."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from fedtune_operator import crdgen, kubeschema

# The extensions a CRD's schema may carry (apiextensions.k8s.io/v1 JSONSchemaProps).
CRD_EXTENSIONS = {
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string", "x-kubernetes-embedded-resource",
    "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type", "x-kubernetes-validations",
}


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
        "Eval": ".status.evalLoss",
        "Epsilon": ".status.privacy.epsilon",
        "Age": ".metadata.creationTimestamp",
    }


def test_schema_is_structural(schema) -> None:
    """No construct that kube-apiserver refuses in a structural schema."""
    for path, node in _walk(schema):
        assert "$ref" not in node and "$defs" not in node, path
        assert "anyOf" not in node and "oneOf" not in node and "allOf" not in node, path
        assert node.get("additionalProperties") is not False, path
        assert "default" not in node and "title" not in node and "const" not in node, path
        assert {k for k in node if k.startswith("x-")} <= CRD_EXTENSIONS, path
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
    assert "(has(self.LORA) ? 1 : 0) + (has(self.PREFIX_TUNING) ? 1 : 0) + (has(self.ADALORA) ? 1 : 0)" in (
        " ".join(rules))
    spec_rules = [r["rule"] for r in schema["properties"]["spec"]["x-kubernetes-validations"]]
    (immutable,) = [r for r in spec_rules if "oldSelf" in r]
    for name in schema["properties"]["spec"]["properties"]:  # every field but runPolicy keeps its value
        assert (f"self.{name} == oldSelf.{name}" in immutable) == (name != "runPolicy"), name
    assert "has(self.trainer) ? has(oldSelf.trainer)" in immutable  # an optional field cannot be added later
    assert any("assist_trainer" in r for r in spec_rules)
    assert schema["properties"]["metadata"]["properties"]["name"]["pattern"].startswith("^[a-z0-9]")


def test_rendered_yaml_has_no_anchors() -> None:
    text = crdgen.render()
    assert "&id" not in text and "*id" not in text
    assert yaml.safe_load(text) == crdgen.crd()


def test_kubernetes_types_carry_their_own_schema(schema) -> None:
    """Tolerations, affinity and the rest are validated as the Pod API validates them."""
    core = kubeschema.CORE
    for where in ("scheduling", "parties.[].scheduling", "controlPlane.scheduling"):
        toleration = spec_field(schema, f"{where}.tolerations.[]")
        assert toleration == kubeschema.structural(f"{core}.Toleration")
        assert toleration["properties"]["effect"]["enum"] == ["NoExecute", "NoSchedule", "PreferNoSchedule"]
        affinity = spec_field(schema, f"{where}.affinity")
        assert affinity == {**kubeschema.structural(f"{core}.Affinity"), "nullable": True}
        terms = affinity["properties"]["nodeAffinity"]["properties"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert terms["required"] == ["nodeSelectorTerms"]
        assert spec_field(schema, f"{where}.imagePullSecrets.[]")["properties"]["name"]["type"] == "string"
        overlay = spec_field(schema, f"{where}.podTemplate")
        assert set(overlay["properties"]["metadata"]["properties"]) == {"labels", "annotations"}
        pod_spec = overlay["properties"]["spec"]
        assert "required" not in pod_spec and pod_spec["properties"]["containers"]["items"]["required"] == ["name"]
        limits = pod_spec["properties"]["containers"]["items"]["properties"]["resources"]["properties"]["limits"]
        assert limits["additionalProperties"] == {"x-kubernetes-int-or-string": True}  # a Quantity
        assert spec_field(schema, f"{where}.nodeSelector")["additionalProperties"] == {"type": "string"}


def test_the_capture_keeps_only_what_the_roots_reference() -> None:
    document = {"components": {"schemas": {
        "a.Root": {"description": "d", "properties": {"x": {"allOf": [{"$ref": "#/components/schemas/a.Used"}]}}},
        "a.Used": {"type": "string", "description": "gone"},
        "a.Unused": {"type": "string"},
    }}}
    assert kubeschema.capture(document, ("a.Root",)) == {
        "a.Root": {"properties": {"x": {"allOf": [{"$ref": "#/components/schemas/a.Used"}]}}},
        "a.Used": {"type": "string"},
    }
