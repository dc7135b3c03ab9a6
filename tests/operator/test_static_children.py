"""The reconciler's memory of complete static children must not outlive a deletion it raced with.

A pass lists the children, a Service is deleted while it runs, the deletion's event arrives
(`static_changed`) and finds the pass busy: the pass must not then record the job as
complete, or the next pass skips the check and the Service never comes back. The race is
made deterministic here with an in-memory stand-in for the API (the real API server cannot
be told to delete between two of the operator's calls); the cluster test
`test_deleted_children_are_recreated` covers the same path against kube-apiserver.
"""

from __future__ import annotations

from typing import Any

from fedtune_operator.jobs import Job
from fedtune_operator.reconcile import Reconciler
from support.children import UID


class MemoryKube:
    """get/list/create over a dict, as `fedtune_operator.kube.Kube` offers them."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.on_list: dict[str, Any] = {}

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((kind, name))

    def list(self, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        listed = [obj for (k, _), obj in self.objects.items() if k == kind]
        hook = self.on_list.pop(kind, None)
        if hook is not None:
            hook()  # happens after the listing was taken: the pass sees the old state
        return listed

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        self.objects[(manifest["kind"], manifest["metadata"]["name"])] = manifest
        return manifest


def reconciler() -> tuple[Reconciler, MemoryKube]:
    rec = Reconciler(api=None, operator=None)  # type: ignore[arg-type]
    rec.kube = MemoryKube()  # type: ignore[assignment]
    return rec, rec.kube  # type: ignore[return-value]


def test_a_deletion_during_the_pass_makes_the_next_pass_look_again(job: Job) -> None:
    rec, kube = reconciler()
    rec._ensure_static(job)
    assert job.uid == UID and job.uid in rec._static_ok
    service = next(name for kind, name in kube.objects if kind == "Service")

    def delete_service() -> None:
        del kube.objects[("Service", service)]
        rec.static_changed(job.uid)  # the DELETED event, handled while the pass runs

    rec.static_changed(job.uid)  # some earlier deletion starts a pass
    kube.on_list["Service"] = delete_service
    rec._ensure_static(job)
    assert job.uid not in rec._static_ok, "a pass that listed before the deletion marked the job complete"
    assert ("Service", service) not in kube.objects

    rec._ensure_static(job)  # the pass the busy event asked for
    assert ("Service", service) in kube.objects
    assert job.uid in rec._static_ok


def test_without_a_deletion_one_pass_completes_the_job(job: Job) -> None:
    rec, kube = reconciler()
    rec._ensure_static(job)
    kinds = {kind for kind, _ in kube.objects}
    assert {"ConfigMap", "Service", "Secret", "NetworkPolicy", "PersistentVolumeClaim"} <= kinds
    assert job.uid in rec._static_ok
