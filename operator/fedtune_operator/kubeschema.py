"""The Kubernetes types' own OpenAPI schemas, for the CRD's pod-scheduling fields.

`kubeschema.json` beside this file is kube-apiserver's `/openapi/v3/api/v1` cut down to the
types in `ROOTS` and everything they reference, descriptions dropped (`capture`). It is made
by `python -m devtools.cluster.openapi` from the apiserver the project builds, and a cluster
test checks that it still matches that apiserver, so the CRD accepts exactly what a Pod
does: a toleration or an affinity the API would reject is rejected at `kubectl apply`,
naming the field.

`structural(name)` turns one type into a structural schema a CRD may carry:
- every `$ref` is inlined (a CRD resolves none);
- a `oneOf` of scalar types (IntOrString, Quantity) becomes `x-kubernetes-int-or-string`;
- defaults are dropped, so the stored resource stays the spec as the user wrote it; with them
  go the list-map keys (which need their keys required or defaulted) and the other
  server-side-apply and patch hints, which say how to merge, not what is valid.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

from . import podpolicy

CAPTURE = Path(__file__).with_name("kubeschema.json")
CORE = "io.k8s.api.core.v1"
META = "io.k8s.apimachinery.pkg.apis.meta.v1"
ROOTS = (f"{CORE}.Toleration", f"{CORE}.Affinity", f"{CORE}.LocalObjectReference", f"{CORE}.PodSpec",
         f"{META}.ObjectMeta")

# Keys that say how to merge or default, not what is valid (see the module's docstring).
_DROPPED = ("description", "default", "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type",
            "x-kubernetes-patch-strategy", "x-kubernetes-patch-merge-key", "x-kubernetes-unions")


def _ref_name(node: dict[str, Any]) -> str | None:
    if "$ref" in node:
        return node["$ref"].rsplit("/", 1)[-1]
    if len(node.get("allOf") or []) == 1 and "$ref" in node["allOf"][0]:
        return node["allOf"][0]["$ref"].rsplit("/", 1)[-1]
    return None


def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def capture(document: dict[str, Any], roots: tuple[str, ...] = ROOTS) -> dict[str, Any]:
    """The schemas of `roots` and of everything they reference, without descriptions."""
    schemas = document["components"]["schemas"]
    wanted: dict[str, Any] = {}

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            name = _ref_name(node)
            if name is not None and name not in wanted:
                wanted[name] = _strip(schemas[name])
                visit(schemas[name])
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    for root in roots:
        visit({"$ref": root})
    return dict(sorted(wanted.items()))


def render_capture(schemas: dict[str, Any], source: str) -> str:
    return json.dumps({"source": source, "schemas": schemas}, indent=1, sort_keys=True) + "\n"


@cache
def _captured() -> dict[str, Any]:
    return json.loads(CAPTURE.read_text(encoding="utf-8"))["schemas"]


def _convert(node: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    name = _ref_name(node)
    if name is not None:
        return _convert(schemas[name], schemas)
    if "oneOf" in node:
        kinds = {branch.get("type") for branch in node["oneOf"]}
        if not kinds <= {"integer", "number", "string"}:
            raise ValueError(f"cannot make a structural schema of oneOf {node['oneOf']!r}")
        return {"x-kubernetes-int-or-string": True}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED:
            continue
        if key == "properties":
            out[key] = {prop: _convert(sub, schemas) for prop, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _convert(value, schemas)
        else:
            out[key] = copy.deepcopy(value)
    return out


def structural(name: str) -> dict[str, Any]:
    """The structural schema of one captured type, e.g. `io.k8s.api.core.v1.Toleration`."""
    return _convert({"$ref": name}, _captured())


# Bounds on the overlay's lists, so that the API server's cost estimate of the CEL rules on their items
# (run for every party) stays within its budget.
MAX_CONTAINERS = 16
MAX_PORTS = 32
MAX_VOLUMES = 64


def pod_template_overlay(allow: Iterable[str] = ()) -> dict[str, Any]:
    """A partial pod template laid over the pods the operator builds: the labels and annotations
    of ObjectMeta, and the safe part of a PodSpec (`podpolicy`), of which no field is required
    (each list item still needs what identifies it, e.g. a container's name). The escalating fields
    stay in the schema, each refused by a CEL rule that names it, but those `allow` names."""
    meta = structural(f"{META}.ObjectMeta")["properties"]
    spec = _cut(structural(f"{CORE}.PodSpec"), "pod", allow)
    spec.pop("required", None)
    props = spec["properties"]
    props["securityContext"]["properties"] = _pick(props["securityContext"]["properties"], podpolicy.POD_SECURITY)
    for key in ("containers", "initContainers"):
        props[key]["maxItems"] = MAX_CONTAINERS
        item = props[key]["items"]
        item["properties"] = _pick(item["properties"], podpolicy.CONTAINER)
        item["properties"]["securityContext"] = _cut(item["properties"]["securityContext"], "securityContext", allow)
        ports = item["properties"]["ports"]
        ports["maxItems"] = MAX_PORTS
        ports["items"] = _cut(ports["items"], "port", allow)
    props["volumes"]["maxItems"] = MAX_VOLUMES
    props["volumes"]["items"] = _cut(props["volumes"]["items"], "volume", allow)
    return {
        "type": "object",
        "properties": {
            "metadata": {"type": "object", "properties": _pick(meta, podpolicy.METADATA)},
            "spec": spec,
        },
    }


def _pick(properties: dict[str, Any], names: Iterable[str]) -> dict[str, Any]:
    return {name: properties[name] for name in names}


def _cut(node: dict[str, Any], level: podpolicy.Level, allow: Iterable[str]) -> dict[str, Any]:
    """One level of the overlay: its safe fields, its escalating ones (refused by CEL unless allowed)."""
    kept = dict.fromkeys([*podpolicy.SAFE[level], *podpolicy.escalating(level)])
    out = {**node, "properties": _pick(node["properties"], kept)}
    rules = [r.rule() for r in podpolicy.refused(level, allow)]
    if rules:
        out["x-kubernetes-validations"] = rules
    return out
