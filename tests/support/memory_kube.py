"""An in-memory stand-in for `fedtune_operator.kube.Kube`, for reconciler tests that need an exact order of
events the real API server cannot be made to produce (its objects keyed by kind and name; one namespace).

It keeps what the API server keeps: a status patch is a JSON merge patch (RFC 7386), so it removes
nothing but the keys it sets to null, and every write is counted (`status_writes`)."""

from __future__ import annotations

import copy
import itertools
from typing import Any

from fedtune_operator.jobs import API_VERSION, KIND
from fedtune_operator.reconcile import Reconciler


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: maps merged key by key, null removes a key, anything else (a list included) replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = apply_merge_patch(out.get(key), value)
    return out


class MemoryKube:
    """get/list/create/delete/patch_status over a dict, as `Kube` offers them."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.on_list: dict[str, Any] = {}  # kind -> called once, after a listing of that kind was taken
        self.status_writes = 0
        self._names = itertools.count(1)

    def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.objects.get((kind, name)))

    def list(self, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        listed = [copy.deepcopy(obj) for (k, _), obj in self.objects.items() if k == kind]
        hook = self.on_list.pop(kind, None)
        if hook is not None:
            hook()  # happens after the listing was taken: the pass sees the old state
        return listed

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        meta = manifest["metadata"]
        name = meta.get("name") or f"{meta['generateName']}{next(self._names)}"
        stored = copy.deepcopy(manifest)
        stored["metadata"].setdefault("uid", f"uid-{next(self._names)}")
        stored["metadata"].setdefault("generation", 1)
        self.objects[(manifest["kind"], name)] = stored
        return copy.deepcopy(stored)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        self.objects.pop((kind, name), None)

    def patch_status(self, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> None:
        obj = self.objects[(kind, name)]
        obj["status"] = apply_merge_patch(obj.get("status") or {}, patch)
        self.status_writes += 1

    def set_spec(self, kind: str, name: str, **fields: Any) -> None:
        """A change of the spec, as `kubectl patch` makes it: the generation moves on."""
        obj = self.objects[(kind, name)]
        obj["spec"] = apply_merge_patch(obj["spec"], fields)
        obj["metadata"]["generation"] += 1

    def kinds(self) -> set[str]:
        return {kind for kind, _ in self.objects}


def memory_reconciler() -> tuple[Reconciler, MemoryKube]:
    """A Reconciler whose API is a MemoryKube (no operator pod: no peer in the NetworkPolicy)."""
    rec = Reconciler(api=None, operator=None)  # type: ignore[arg-type]
    rec.kube = MemoryKube()  # type: ignore[assignment]
    return rec, rec.kube  # type: ignore[return-value]


def memory_job(document: dict[str, Any], uid: str, namespace: str = "team-a") -> tuple[Reconciler, MemoryKube, str]:
    """A memory reconciler whose API holds `document` as a FederatedFineTune of `uid`; and its name."""
    rec, kube = memory_reconciler()
    name = document["metadata"]["name"]
    kube.create({"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name, "namespace": namespace,
                                                                        "uid": uid}, "spec": document["spec"]})
    return rec, kube, name
