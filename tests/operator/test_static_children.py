"""The reconciler's memory of complete static children must not outlive a deletion it raced with.

A pass lists the children, a Service is deleted while it runs, the deletion's event arrives
(`static_changed`) and finds the pass busy: the pass must not then record the job as
complete, or the next pass skips the check and the Service never comes back. The race is
made deterministic here with an in-memory stand-in for the API (the real API server cannot
be told to delete between two of the operator's calls); the cluster test
`test_deleted_children_are_recreated` covers the same path against kube-apiserver.
"""

from __future__ import annotations

from fedtune_operator.jobs import Job
from support.children import UID
from support.memory_kube import memory_reconciler as reconciler


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
