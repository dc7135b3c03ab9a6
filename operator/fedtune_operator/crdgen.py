"""Generate the FederatedFineTune CustomResourceDefinition from the pydantic job spec.

The spec module (`fedtune.spec`) is the one source of truth: this turns its JSON schema
into a Kubernetes *structural* OpenAPI v3 schema, so that kube-apiserver rejects a bad
spec at `kubectl apply` and names the field, before the operator ever sees it.

    python -m fedtune_operator.crdgen            # print the CRD
    python -m fedtune_operator.crdgen --write    # rewrite crds/ and the chart's crds/
    python -m fedtune_operator.crdgen --check    # exit 1 when the committed files are stale
    python -m fedtune_operator.crdgen --allow hostIPC   # print one whose pod templates may set hostIPC: true

What the conversion does (structural schemas are a subset of JSON schema):
- inlines every `$ref` (Kubernetes resolves none);
- `Optional[X]` (`anyOf: [X, null]`) becomes X with `nullable: true`;
- a union of different types (e.g. `list[str] | str`) cannot be typed structurally, so it
  becomes `x-kubernetes-preserve-unknown-fields` and is left to the operator's own check;
- `const` / `Literal` become `enum`; draft-2020 numeric `exclusiveMinimum: 0` becomes
  OpenAPI 3.0's `minimum: 0, exclusiveMinimum: true`;
- models that accept extra keys (`Lora`, `Trainer`) keep their typed properties and add
  `x-kubernetes-preserve-unknown-fields: true`; strict models list only their properties,
  so the API server's strict field validation reports an unknown key by its path;
- defaults are dropped: the spec module applies them, and the stored object stays the
  spec as the user wrote it;
- cross-field rules that pydantic checks in model validators are repeated as CEL
  `x-kubernetes-validations` (below), so they too fail at apply time;
- fields the spec marks with a Kubernetes type (`spec.KUBE_TYPE`: tolerations, affinity,
  imagePullSecrets, the pod template overlay) get that type's own schema, captured from
  kube-apiserver (`kubeschema`); the overlay's only the safe part, escalations refused (`podpolicy`).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from fedtune.spec import KUBE_TYPE, MAX_PARTIES, FederatedFineTune, JobSpec, Peft

from . import kubeschema, podpolicy
from .jobs import GROUP, KIND, PLURAL, VERSION

SINGULAR = KIND.lower()
SHORT_NAMES = ["fft"]
CRD_NAME = f"{PLURAL}.{GROUP}"

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = "federatedfinetune.yaml"
CRD_PATHS = (REPO_ROOT / "crds" / CRD_FILE, REPO_ROOT / "charts" / "fedtune-operator" / "crds" / CRD_FILE)

# Keys of the JSON schema that carry over unchanged into the structural schema.
_KEPT = ("description", "minimum", "maximum", "minLength", "maxLength", "pattern", "minItems", "maxItems", "enum")

# The cross-field rules of `fedtune.spec`'s model validators, as CEL, keyed by model name.
# Messages match the spec module's so both layers read alike.
_CEL_RULES: dict[str, list[dict[str, str]]] = {
    # Of the types with a section of their own, at most one; the operator's own check counts the others.
    "Peft": [
        {
            "rule": " + ".join(f"(has(self.{name}) ? 1 : 0)" for name in Peft.model_fields) + " <= 1",
            "message": "set exactly one adapter type (LORA, PREFIX_TUNING or another of peft's)",
        }
    ],
    "Encryption": [
        {"rule": "!(has(self.plain) && has(self.otp))", "message": "set exactly one of `plain` or `otp`"},
    ],
    "OutputStorage": [
        {
            "rule": "!has(self.claimName) || !(has(self.size) || has(self.storageClassName) || has(self.accessMode) "
                    "|| has(self.retain))",
            "message": "`claimName` names an existing claim: size, storageClassName, accessMode and retain would "
                       "not apply",
        }
    ],
    "JobSpec": [
        {
            "rule": "self.parties.filter(p, p.role == 'assist_trainer').size() == 1 || "
            "(size(self.parties) == 1 && self.parties[0].role == 'label_trainer')",
            "message": "parties: exactly one party must have role `assist_trainer` "
            "(or a single label_trainer trains alone)",
            "fieldPath": ".parties",
        },
        {
            "rule": "self.parties.exists(p, p.role == 'label_trainer')",
            "message": "parties: at least one party must have role `label_trainer`",
            "fieldPath": ".parties",
        },
    ],
}
# A running federation cannot change its spec consistently under every party; like a Job's
# template, the spec is fixed once applied, but for spec.runPolicy (a queue suspends and
# resumes jobs). The rule is made from the spec's fields (`_immutable_rule`).
MUTABLE_SPEC_FIELDS = ("runPolicy",)
IMMUTABLE_MESSAGE = "spec is immutable but for runPolicy: delete the resource and apply it again"

# Rules on the whole object: child object names are `<job>-<party>`, and a Service name
# is a DNS label of at most 63 characters.
_ROOT_RULES = [
    {
        "rule": "self.spec.parties.all(p, size(self.metadata.name) + 1 + size(p.name) <= 63)",
        "message": "metadata.name and every parties[].name must together fit a Service name "
        "(`<name>-<party>`, at most 63 characters)",
        "fieldPath": ".metadata.name",
    },
    {
        "rule": "self.spec.parties.all(p, !(p.name.lowerAscii() in ['scheduler', 'redis']))",
        "message": "parties[].name `scheduler` and `redis` are reserved on Kubernetes (the job's own pods)",
        "fieldPath": ".spec.parties",
    },
    {
        "rule": "self.metadata.name.matches('^[a-z]')",
        "message": "metadata.name must start with a letter (it prefixes Service names)",
        "fieldPath": ".metadata.name",
    },
]

# Kubernetes forbids `x-kubernetes-validations` cost estimates past a limit; bounding the
# lists that CEL iterates keeps the estimate small. The spec refuses more parties itself.
_MAX_PARTIES = MAX_PARTIES
_MAX_PARTY_NAME = 40


class SchemaError(ValueError):
    """The pydantic schema holds a construct this generator cannot express."""


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Follow a `$ref` (directly or through a one-item `allOf`); return the target and its name."""
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        merged = {**defs[name], **{k: v for k, v in node.items() if k != "$ref"}}
        return merged, name
    if "allOf" in node and len(node["allOf"]) == 1:
        inner, name = _resolve(node["allOf"][0], defs)
        return {**inner, **{k: v for k, v in node.items() if k != "allOf"}}, name
    return node, None


def _kube_type(node: dict[str, Any], allow: tuple[str, ...]) -> dict[str, Any]:
    """A field typed by a Kubernetes type (or a list of them): that type's own schema (the pod template
    overlay's: its safe part, and escalations refused but those `allow` names)."""
    name = node[KUBE_TYPE]
    schema = kubeschema.pod_template_overlay(allow) if name == "PodTemplateOverlay" else kubeschema.structural(name)
    nullable = any(b.get("type") == "null" for b in node.get("anyOf", []))
    if node.get("type") == "array":
        schema = {"type": "array", "items": schema}
    return {**schema, "nullable": True} if nullable else schema


def convert(node: dict[str, Any], defs: dict[str, Any], allow: tuple[str, ...] = ()) -> dict[str, Any]:
    """One JSON-schema node (pydantic's output) -> one structural OpenAPI v3 node."""
    node, model = _resolve(node, defs)

    if KUBE_TYPE in node:
        return _kube_type(node, allow)
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        nullable = len(branches) < len(node["anyOf"])
        if len(branches) == 1:
            out = convert({**branches[0], **{k: v for k, v in node.items() if k in ("description",)}}, defs, allow)
        else:
            # Structural schemas cannot say "array or string"; the operator's spec check does.
            out = {"x-kubernetes-preserve-unknown-fields": True}
            if "description" in node:
                out["description"] = node["description"]
        if nullable:
            out["nullable"] = True
        return out

    out: dict[str, Any] = {k: copy.deepcopy(node[k]) for k in _KEPT if k in node}
    if "const" in node:
        out["enum"] = [node["const"]]
    kind = node.get("type")
    if kind is None and "enum" in out:
        kind = "integer" if all(isinstance(v, int) for v in out["enum"]) else "string"
    if kind is None:
        raise SchemaError(f"no type for schema node {node!r}")
    out["type"] = kind

    for bound in ("exclusiveMinimum", "exclusiveMaximum"):
        if bound in node:
            if isinstance(node[bound], bool):
                raise SchemaError(f"{bound} must be a number in pydantic's JSON schema, got {node[bound]!r}")
            out["minimum" if bound == "exclusiveMinimum" else "maximum"] = node[bound]
            out[bound] = True

    if kind == "array":
        out["items"] = convert(node["items"], defs, allow)
    elif kind == "object":
        _convert_object(node, defs, out, allow)

    if model in _CEL_RULES:
        out["x-kubernetes-validations"] = copy.deepcopy(_CEL_RULES[model])
    return _ordered(out)


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    """`type` and `description` first: the generated YAML is read by people too."""
    head = {k: node[k] for k in ("type", "description") if k in node}
    return {**head, **{k: v for k, v in node.items() if k not in head}}


def _convert_object(node: dict[str, Any], defs: dict[str, Any], out: dict[str, Any], allow: tuple[str, ...]) -> None:
    props = node.get("properties", {})
    extra = node.get("additionalProperties")
    if props:
        out["properties"] = {name: convert(sub, defs, allow) for name, sub in props.items()}
        if node.get("required"):
            out["required"] = list(node["required"])
        if extra is True:
            # e.g. `Lora`, `Trainer`: typed common keys, any other peft/transformers key passes.
            out["x-kubernetes-preserve-unknown-fields"] = True
        elif isinstance(extra, dict):
            raise SchemaError("an object with both properties and typed additionalProperties is not structural")
    elif isinstance(extra, dict):
        out["additionalProperties"] = convert(extra, defs, allow)
    else:
        # A free-form mapping (`dict[str, Any]`, e.g. `encryption.plain`).
        out["x-kubernetes-preserve-unknown-fields"] = True


def _immutable_rule(schema: dict[str, Any]) -> dict[str, str]:
    """A transition rule: every field of .spec but MUTABLE_SPEC_FIELDS keeps its value, and one that
    was absent stays absent (a rule on the field itself would not run when it is added)."""
    required = set(schema.get("required", []))
    terms = []
    for name in schema["properties"]:
        if name in MUTABLE_SPEC_FIELDS:
            continue
        same = f"self.{name} == oldSelf.{name}"
        terms.append(same if name in required else
                     f"(has(self.{name}) ? has(oldSelf.{name}) && {same} : !has(oldSelf.{name}))")
    return {"rule": " && ".join(terms), "message": IMMUTABLE_MESSAGE}


def spec_schema(allow: tuple[str, ...] = ()) -> dict[str, Any]:
    """The structural schema of `.spec`, from `fedtune.spec.JobSpec` (`allow`: `podpolicy.NAMES` to let
    through pod templates)."""
    raw = JobSpec.model_json_schema(mode="validation")
    defs = raw.pop("$defs", {})
    defs["JobSpec"] = raw
    schema = convert({"$ref": "#/$defs/JobSpec"}, defs, allow)
    schema["x-kubernetes-validations"].append(_immutable_rule(schema))
    parties = schema["properties"]["parties"]
    parties["maxItems"] = _MAX_PARTIES
    # Already implied by the name's pattern; stated so CEL's cost estimate knows it.
    parties["items"]["properties"]["name"]["maxLength"] = _MAX_PARTY_NAME
    return schema


def metadata_schema() -> dict[str, Any]:
    """Kubernetes allows only `metadata.name` (and generateName) restrictions in a CRD."""
    name = FederatedFineTune.model_json_schema()["$defs"]["Metadata"]["properties"]["name"]
    return {"type": "object", "properties": {"name": {k: name[k] for k in ("type", "pattern") if k in name}}}


def status_schema() -> dict[str, Any]:
    """What the operator writes; open for fields later versions add, so that what the API server stores
    is what the operator wrote (it writes only when that would change)."""
    component = {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {
            "state": {"type": "string"},
            "role": {"type": "string"},
            "pod": {"type": "string"},
            "restarts": {"type": "integer"},
            "failures": {"type": "integer"},
            "exitCode": {"type": "integer", "nullable": True},
            "reason": {"type": "string", "nullable": True},
            "message": {"type": "string", "nullable": True},
            "output": {"type": "string", "description": "where the party writes its adapters, e.g. "
                                                        "`pvc://<job>-output-<party>/<party>/`"},
            "adapter": {"type": "string", "description": "once the job succeeded: the final global adapter"},
        },
    }
    condition = {
        "type": "object",
        "required": ["type", "status"],
        "properties": {
            "type": {"type": "string"},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "reason": {"type": "string"},
            "message": {"type": "string"},
            "lastTransitionTime": {"type": "string", "format": "date-time"},
            "observedGeneration": {"type": "integer", "description": "the spec's generation it was decided from"},
        },
    }
    return {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
        "properties": {
            "phase": {"type": "string", "enum": ["Pending", "Running", "Suspended", "Succeeded", "Failed"]},
            "round": {"type": "string", "description": "aggregation rounds done, `k/K`"},
            "loss": {"type": "number", "nullable": True, "description": "the last training loss reported"},
            "evalLoss": {"type": "number", "description": "the last round's global adapter on the parties' valsets"},
            "evalLosses": {
                "type": "array",
                "description": "the global adapter's loss on the parties' valsets, by round (0: the initial one)",
                "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                          "properties": {"round": {"type": "integer"}, "loss": {"type": "number"}}},
            },
            "output": {"type": "string", "description": "where the adapters land, e.g. `pvc://<job>-output-<party>/`"},
            "message": {"type": "string"},
            "startTime": {"type": "string", "format": "date-time"},
            "completionTime": {"type": "string", "format": "date-time"},
            "observedGeneration": {"type": "integer"},
            "scheduler": component,
            "parties": {"type": "object", "additionalProperties": copy.deepcopy(component)},
            "conditions": {"type": "array", "items": condition},
            "warnings": {"type": "array", "items": {"type": "string"},
                         "description": "what the job's settings leave open (each also a Warning event)"},
            "dropouts": {"type": "object", "description": "secagg_plus: round -> the label_trainers it went without",
                         "additionalProperties": {"type": "array", "items": {"type": "string"}}},
            "privacy": {
                "type": "object",
                "description": "privacy.dp: the (epsilon, delta) guarantee of the rounds done so far",
                # Kept as written (a pruned key would differ from what the operator compares against).
                "x-kubernetes-preserve-unknown-fields": True,
                "properties": {
                    "epsilon": {"type": "number", "nullable": True, "description": "null: no noise, no finite ε"},
                    "delta": {"type": "number"},
                    "rounds": {"type": "integer"},
                    "noise_multiplier": {"type": "number"},
                    "clip_norm": {"type": "number"},
                    "accountant": {"type": "string"},
                },
            },
        },
    }


def crd(allow: tuple[str, ...] = ()) -> dict[str, Any]:
    schema = {
        "type": "object",
        "description": "A horizontal federated fine-tuning job (LoRA or P-tuning v2) of a ChatGLM-family model.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": metadata_schema(),
            "spec": spec_schema(allow),
            "status": status_schema(),
        },
        "x-kubernetes-validations": copy.deepcopy(_ROOT_RULES),
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/part-of": "fedtune"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": ["fedtune"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Round", "type": "string", "jsonPath": ".status.round"},
                        {"name": "Loss", "type": "number", "jsonPath": ".status.loss"},
                        {"name": "Eval", "type": "number", "jsonPath": ".status.evalLoss"},
                        {"name": "Epsilon", "type": "number", "jsonPath": ".status.privacy.epsilon"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


HEADER = (
    "# Generated by `python -m fedtune_operator.crdgen --write` from fedtune.spec; do not edit.\n"
    "# tests/operator/test_crdgen.py fails when this file and the spec module disagree.\n"
)


def render(allow: tuple[str, ...] = ()) -> str:
    return HEADER + yaml.safe_dump(crd(allow), sort_keys=False, allow_unicode=True, width=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the committed CRD files")
    mode.add_argument("--check", action="store_true", help="exit 1 when the committed CRD files are stale")
    parser.add_argument("--allow", action="append", default=[], choices=podpolicy.NAMES, metavar="FIELD",
                        help="print a CRD whose pod templates may set FIELD (repeatable; the chart's "
                             f"podTemplate.allow must name it too): {', '.join(podpolicy.NAMES)}")
    args = parser.parse_args(argv)
    if args.allow and (args.write or args.check):
        parser.error("--allow prints a CRD for one cluster; the committed files refuse every escalating field")
    text = render(tuple(args.allow))
    if args.write:
        for path in CRD_PATHS:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(REPO_ROOT)}")
        return 0
    if args.check:
        stale = [p for p in CRD_PATHS if not p.exists() or p.read_text(encoding="utf-8") != text]
        for path in stale:
            print(f"{path.relative_to(REPO_ROOT)} is stale: run `python -m fedtune_operator.crdgen --write`")
        return 1 if stale else 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
