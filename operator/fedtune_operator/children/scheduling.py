"""Scheduling of a job's pods: spec.scheduling, with parties[].scheduling laid over it for a party's pod;
for the scheduler and Redis only what is not placement, with spec.controlPlane.scheduling laid over it
(they need no GPU, so a GPU pool's tolerations and selectors are not theirs).

Tolerations, nodeSelector, affinity, priorityClassName, schedulerName and imagePullSecrets
go into the pod spec, labels and annotations into its metadata, and `podTemplate` is then
merged over the whole pod the way `kubectl patch --type strategic` merges: maps key by key,
the lists below item by item on their key (a container by its name, a mount by its path),
any other value replaced. What the operator relies on stays its own: the pod's name,
namespace, owner, its labels (the Services and the NetworkPolicy select by them) and
restartPolicy Never (the operator decides about retries).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from fedtune.spec import Party, Scheduling

from .. import podpolicy
from ..jobs import Job

# List fields merged item by item, on this key of their items (as strategic merge patch does).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
}
_POD_FIELDS = ("nodeSelector", "affinity", "priorityClassName", "schedulerName")


def template_problems(job: Job, allow: Iterable[str] = ()) -> list[str]:
    """Each field of the job's pod template overlays that the operator will not lay over a pod
    (`podpolicy`: outside the safe list, or an escalation `allow` does not name)."""
    spec = job.spec
    found = [("spec.scheduling", spec.scheduling), ("spec.controlPlane.scheduling", spec.controlPlane.scheduling)]
    found += [(f"spec.parties[{i}].scheduling", p.scheduling) for i, p in enumerate(spec.parties)]
    return [problem for where, sched in found if sched is not None
            for problem in podpolicy.problems(sched.podTemplate, f"{where}.podTemplate", allow)]


def for_pod(job: Job, party: Party | None) -> Scheduling:
    """The scheduling of one pod: a party's (the job's, with the party's own laid over it), or with None,
    the control pods' (Redis, the scheduler)."""
    if party is None:
        return _lay_over(control_base(job.spec.scheduling), job.spec.controlPlane.scheduling)
    return _lay_over(job.spec.scheduling, party.scheduling)


def control_base(job_wide: Scheduling) -> Scheduling:
    """What the control pods take of spec.scheduling: who they are, where their images come from, their
    priority and scheduler; no placement and no pod template (those are for the parties' pods)."""
    return Scheduling(labels=job_wide.labels, annotations=job_wide.annotations,
                      imagePullSecrets=job_wide.imagePullSecrets, priorityClassName=job_wide.priorityClassName,
                      schedulerName=job_wide.schedulerName)


def _lay_over(base: Scheduling, own: Scheduling | None) -> Scheduling:
    """`own` laid over `base`: lists add up, maps merge (own's keys win), single values are replaced."""
    if own is None:
        return base
    overlays = [t for t in (base.podTemplate, own.podTemplate) if t]
    return Scheduling(
        tolerations=_union(base.tolerations, own.tolerations),
        nodeSelector={**base.nodeSelector, **own.nodeSelector},
        affinity=own.affinity if own.affinity is not None else base.affinity,
        priorityClassName=own.priorityClassName or base.priorityClassName,
        schedulerName=own.schedulerName or base.schedulerName,
        imagePullSecrets=_union(base.imagePullSecrets, own.imagePullSecrets),
        labels={**base.labels, **own.labels},
        annotations={**base.annotations, **own.annotations},
        podTemplate=_merge_all(overlays) if overlays else None,
    )


def apply(pod: dict[str, Any], scheduling: Scheduling) -> dict[str, Any]:
    """`pod` with `scheduling` in force (a new manifest; `pod` is not changed)."""
    out = copy.deepcopy(pod)
    spec, meta = out["spec"], out["metadata"]
    for name in _POD_FIELDS:
        value = getattr(scheduling, name)
        if value:
            spec[name] = copy.deepcopy(value)
    if scheduling.tolerations:
        spec["tolerations"] = copy.deepcopy(scheduling.tolerations)
    if scheduling.imagePullSecrets:
        spec["imagePullSecrets"] = copy.deepcopy(scheduling.imagePullSecrets)
    if scheduling.labels:
        meta["labels"] = {**scheduling.labels, **meta["labels"]}
    if scheduling.annotations:
        meta["annotations"] = {**meta.get("annotations", {}), **scheduling.annotations}
    if scheduling.podTemplate:
        out = merge(out, scheduling.podTemplate)
        # What the operator relies on stays its own.
        for key in ("name", "namespace", "ownerReferences"):
            out["metadata"][key] = copy.deepcopy(pod["metadata"][key])
        out["metadata"]["labels"].update(pod["metadata"]["labels"])
        out["spec"]["restartPolicy"] = pod["spec"]["restartPolicy"]
    return out


def merge(base: Any, overlay: Any, field: str = "") -> Any:
    """`overlay` merged over `base` (neither is changed): maps key by key, the lists of
    `MERGE_KEYS` item by item, anything else replaced."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        out = dict(base)
        for key, value in overlay.items():
            out[key] = merge(base[key], value, key) if key in base else copy.deepcopy(value)
        return out
    key = MERGE_KEYS.get(field)
    if key and isinstance(base, list) and isinstance(overlay, list):
        out_list = list(base)
        for item in overlay:
            at = next((i for i, old in enumerate(out_list) if isinstance(old, dict) and old.get(key) == item.get(key)),
                      None)
            if at is None:
                out_list.append(copy.deepcopy(item))
            else:
                out_list[at] = merge(out_list[at], item)
        return out_list
    return copy.deepcopy(overlay)


def _merge_all(overlays: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for overlay in overlays:
        out = merge(out, overlay)
    return out


def _union(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [*first, *(item for item in second if item not in first)]
