"""What the operator's no-cluster tests share: the example job as the operator sees it, and views of its children."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from fedtune.spec import parse_job
from fedtune_operator import resources as r

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lora-3party.yaml"
UID = "0b5e6f0e-1111-2222-3333-444455556666"


def make_job(document: dict[str, Any], namespace: str = "team-a") -> r.Job:
    doc = copy.deepcopy(document)
    doc["metadata"]["namespace"] = namespace
    return r.Job(doc["metadata"]["name"], namespace, UID, doc["spec"], parse_job(doc))


def by_kind_name(children: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(c["kind"], c["metadata"]["name"]): c for c in children}


def container(pod: dict[str, Any]) -> dict[str, Any]:
    (c,) = pod["spec"]["containers"]
    return c
