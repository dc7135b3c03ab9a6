"""Status logic: observed pods + the previous status -> the next status and what to do.

Pure (no API calls): `plan()` decides, the reconciler in `reconcile.py` acts. Rules:
- The scheduler and each local party run as a bare Pod (restartPolicy Never). A pod that
  disappears or fails is recreated; each failure counts against `spec.backoffLimit`, and
  one failure past it makes the resource Failed with a condition naming the party, its
  reason, exit code and message (then the job's other running pods are stopped).
- Phase: any role Running -> Running (and it stays Running while a role restarts); the
  scheduler and every local party Succeeded -> Succeeded; Succeeded and Failed are final.
- Round and loss (and, when the job has them, its dropouts and ε) come from the runtime's
  job state in Redis (`Progress`), when it could be read; otherwise the last known values stay.
  The runtime's warnings (DP without secure aggregation, ...) join `status.warnings`, each
  with a Warning event, once.
- A pod whose image cannot be pulled (or is not on the node) stays Pending with the kubelet
  retrying: condition `ImagesReady` False names the role and the image, and so does
  `status.message`, until the image is there.
- Condition `TLS` says how the roles authenticate each other; a job with
  `spec.tls.enabled: false` gets it False with a Warning event, once.
- A job whose assist_trainer is remote (another organisation hosts the federation) runs
  no scheduler and no Redis here: `redis_pod_name` is None and no scheduler workload.
"""

from __future__ import annotations

import copy
import datetime
import re
from dataclasses import dataclass, field
from typing import Any

from fedtune.roles import SCHEDULER
from fedtune.spec import RunPolicy, checkpoint_name

from .jobs import Workload

PENDING, RUNNING, SUSPENDED, SUCCEEDED, FAILED = "Pending", "Running", "Suspended", "Succeeded", "Failed"
FINAL = (SUCCEEDED, FAILED)
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # how status writes times (`reconcile.now_iso`)


@dataclass(frozen=True)
class PodView:
    """What the status logic reads of one pod."""

    name: str
    uid: str
    phase: str
    deleting: bool = False
    ip: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    message: str | None = None
    image: str | None = None
    image_error: str | None = None  # why the kubelet cannot start the image (reason: message)
    claims: tuple[tuple[str, str], ...] = ()  # (mount path, claim name) of the role's container


# The kubelet's waiting reasons for an image it cannot get.
IMAGE_ERRORS = ("ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName", "ImageInspectError",
                "RegistryUnavailable")  # fmt: skip


@dataclass(frozen=True)
class Progress:
    """The runtime's view, read from Redis (`fedtune.federation.jobstate.JobStatus`)."""

    round: int
    rounds: int
    loss: float | None = None
    error: str = ""
    parties: dict[str, dict[str, Any]] = field(default_factory=dict)
    eval_loss: list[dict[str, float]] = field(default_factory=list)  # by round, over every valset
    dropouts: dict[str, list[str]] = field(default_factory=dict)  # secagg_plus: round -> who it went without
    privacy: dict[str, Any] | None = None  # privacy.dp: ε for δ so far
    warnings: list[str] = field(default_factory=list)  # what the job's settings leave open, said at its start


@dataclass(frozen=True)
class Tls:
    """How the job's roles authenticate each other, for the `TLS` condition."""

    enabled: bool = True
    ca: str = ""  # where the certificates come from, e.g. "Secret poems-lora-ca"


TLS_DISABLED_MESSAGE = (
    "spec.tls.enabled is false: the roles talk gRPC in the clear, and anyone who reaches their ports "
    "can join the federation or act for a party; remove it to turn mutual TLS back on"
)


@dataclass
class Plan:
    status: dict[str, Any]
    create: list[Workload] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)  # pod names
    create_redis: bool = False
    # (type, reason, message) for Kubernetes Events on the resource.
    events: list[tuple[str, str, str]] = field(default_factory=list)


def pod_view(pod: dict[str, Any]) -> PodView:
    """Read a pod (as the API returns it, camelCase keys) into a `PodView`."""
    meta = pod.get("metadata", {})
    status = pod.get("status") or {}
    exit_code = reason = message = image_error = None
    spec = pod.get("spec") or {}
    image = next((c.get("image") for c in spec.get("containers") or []), None)
    for cs in status.get("containerStatuses") or []:
        terminated = (cs.get("state") or {}).get("terminated")
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if terminated:
            exit_code = terminated.get("exitCode")
            reason = terminated.get("reason")
            message = terminated.get("message")
        if waiting.get("reason") in IMAGE_ERRORS:
            image = cs.get("image") or image
            image_error = f"{waiting['reason']}: {waiting.get('message') or 'no message'}"[:512]
    # Pod-level reasons (Evicted, DeadlineExceeded) when no container said more.
    reason = reason or status.get("reason")
    message = message or status.get("message")
    return PodView(
        name=meta["name"],
        uid=meta.get("uid", ""),
        phase=status.get("phase") or PENDING,
        deleting=bool(meta.get("deletionTimestamp")),
        ip=status.get("podIP"),
        exit_code=exit_code,
        reason=reason,
        message=(message or "").strip()[-1024:] or None,  # keep status small: the tail says most
        image=image,
        image_error=image_error,
        claims=_claim_mounts(spec),
    )


def _claim_mounts(spec: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """(mount path, claim name) for each claim the pod's first container mounts."""
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec.get("volumes") or []
              if v.get("persistentVolumeClaim")}  # fmt: skip
    containers = spec.get("containers") or [{}]
    mounts = containers[0].get("volumeMounts") or []
    return tuple((m["mountPath"], claims[m["name"]]) for m in mounts if m.get("name") in claims)


def claims_in(message: str, claims: tuple[tuple[str, str], ...]) -> str:
    """The claims whose files `message` names, as `claim C (mounted at P)`."""
    named = [f"claim {claim} (mounted at {path})" for path, claim in claims
             if re.search(re.escape(path.rstrip("/")) + r"(/|\b)", message)]  # fmt: skip
    return ", ".join(named)


def observed(status: dict[str, Any], generation: int | None) -> dict[str, Any]:
    """`status` as decided from the spec's `generation`: the status and each condition say so
    (`observedGeneration`), as Kubernetes' own controllers write them."""
    out = {**status, "observedGeneration": generation}
    if "conditions" in status:
        out["conditions"] = [{**c, "observedGeneration": generation} for c in status["conditions"]]
    return out


def find_condition(conditions: list[dict[str, Any]], type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def set_condition(
    conditions: list[dict[str, Any]], type_: str, status: str, reason: str, message: str, now: str
) -> list[dict[str, Any]]:
    """Upsert a condition; lastTransitionTime moves only when `status` flips."""
    out = [c for c in conditions if c.get("type") != type_]
    old = find_condition(conditions, type_)
    since = old["lastTransitionTime"] if old and old.get("status") == status else now
    out.append({"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": since})
    return out


def tls_condition(conditions: list[dict[str, Any]], tls: Tls, now: str) -> tuple[list[dict[str, Any]], list]:
    """The `TLS` condition, and the Warning event when TLS has just been found off."""
    if tls.enabled:
        message = f"mutual TLS: every role has its own certificate from {tls.ca or 'the federation CA'}"
        return set_condition(conditions, "TLS", "True", "MutualTLS", message, now), []
    old = find_condition(conditions, "TLS")
    events = [] if old and old.get("reason") == "TLSDisabled" else [("Warning", "TLSDisabled", TLS_DISABLED_MESSAGE)]
    return set_condition(conditions, "TLS", "False", "TLSDisabled", TLS_DISABLED_MESSAGE, now), events


def waiting_status(
    prev: dict[str, Any], type_: str, reason: str, message: str, now: str
) -> tuple[dict[str, Any], list]:
    """Something the job names is not there (yet), e.g. its CA Secret (`TLS`, `CAUnavailable`) or a
    StorageClass (`Storage`, `StorageClassNotFound`): the job waits, saying why, and no pod starts.
    The Warning event is posted once per message."""
    status = copy.deepcopy(prev)
    status.setdefault("phase", PENDING)
    old = find_condition(status.get("conditions", []), type_)
    status["conditions"] = set_condition(status.get("conditions", []), type_, "False", reason, message, now)
    status["message"] = message
    same = old is not None and old.get("reason") == reason and old.get("message") == message
    return status, [] if same else [("Warning", reason, message)]


def invalid_status(prev: dict[str, Any], message: str, now: str) -> dict[str, Any]:
    """A spec the operator cannot run (kube-apiserver let it through): Failed, nothing created."""
    status = copy.deepcopy(prev)
    status["phase"] = FAILED
    status.setdefault("completionTime", now)
    conditions = set_condition(status.get("conditions", []), "SpecValid", "False", "SpecInvalid", message, now)
    status["conditions"] = set_condition(conditions, FAILED, "True", "SpecInvalid", message, now)
    return status


def _who(key: str) -> str:
    return "scheduler" if key == SCHEDULER else f"party `{key}`"


def describe_failure(key: str, rec: dict[str, Any]) -> str:
    what = _who(key)
    parts = []
    if rec.get("exitCode") is not None:
        parts.append(f"exit code {rec['exitCode']}")
    if rec.get("reason"):
        parts.append(f"reason {rec['reason']}")
    detail = ", ".join(parts) or "no exit code"
    tail = f": {rec['message']}" if rec.get("message") else ""
    # A file it could not read or write lies on a claim: say which, by name.
    claim = f" [{rec['claim']}]" if rec.get("claim") else ""
    return f"{what} failed ({detail}){claim}{tail}"


def _record(prev: dict[str, Any], workload: Workload) -> dict[str, Any]:
    rec = copy.deepcopy(prev) if prev else {}
    rec.setdefault("state", PENDING)
    rec.setdefault("restarts", 0)
    rec.setdefault("failures", 0)
    rec["role"] = workload.role
    rec["pod"] = workload.pod_name
    return rec


def _step_workload(rec: dict[str, Any], pod: PodView | None, w: Workload, backoff_limit: int, plan: Plan) -> bool:
    """Advance one role's record from its pod; returns True when it exhausted its retries."""
    if pod is None:
        if rec["state"] == SUCCEEDED:
            return False  # done: a pod removed after success is not run again
        if rec.get("podUID"):
            # The pod we saw is gone (we deleted it after a failure, or someone else did).
            rec["restarts"] += 1
            cause = "after a failure" if rec["state"] in (FAILED, "Restarting") else "after it was deleted"
            plan.events.append(("Normal", "Recreating", f"recreating pod {w.pod_name} {cause}"))
            rec["podUID"] = None
        rec["state"] = PENDING
        plan.create.append(w)
        return False
    rec["podUID"] = pod.uid
    if pod.deleting:
        rec["state"] = "Terminating" if rec["state"] not in (FAILED, "Restarting") else "Restarting"
        return False
    if pod.phase == FAILED:
        if rec.get("failedUID") != pod.uid:  # count each failed pod once, whatever happens next
            rec["failedUID"] = pod.uid
            rec["failures"] += 1
            rec.update(exitCode=pod.exit_code, reason=pod.reason, message=pod.message)
            rec["claim"] = claims_in(pod.message or "", pod.claims) or None
            plan.events.append(("Warning", "PodFailed", describe_failure(w.key, rec)))
        if rec["failures"] > backoff_limit:
            rec["state"] = FAILED
            return True
        rec["state"] = "Restarting"
        plan.delete.append(pod.name)
        return False
    rec["state"] = pod.phase if pod.phase in (PENDING, RUNNING, SUCCEEDED) else "Unknown"
    if pod.phase == SUCCEEDED:
        rec["exitCode"] = 0
    return False


def _images_condition(conditions: list[dict[str, Any]], status: dict[str, Any], records: dict[str, Any],
                      scheduler: dict[str, Any] | None, pods: dict[str, PodView], redis_pod_name: str | None,
                      phase: str, now: str, result: Plan) -> list[dict[str, Any]]:  # fmt: skip
    """`ImagesReady`: False, naming each role and image the kubelet cannot get; True once they start."""
    roles = {**({SCHEDULER: scheduler} if scheduler is not None else {}), **records}
    owners = [(_who(key), rec.get("pod")) for key, rec in roles.items()]
    if redis_pod_name:
        owners.append(("Redis", redis_pod_name))
    problems = [f"{who}: image {pod.image} cannot be started ({pod.image_error})"
                for who, name in owners if (pod := pods.get(name or "")) is not None and pod.image_error]  # fmt: skip
    old = find_condition(conditions, "ImagesReady")
    if problems and phase not in FINAL:
        message = "; ".join(problems)
        if not old or old.get("message") != message:
            result.events.append(("Warning", "ImageUnavailable", message))
        status["message"] = message
        return set_condition(conditions, "ImagesReady", "False", "ImageUnavailable", message, now)
    if old is not None and old.get("status") == "False":
        if status.get("message") == old.get("message"):
            status.pop("message", None)
        return set_condition(conditions, "ImagesReady", "True", "ImagesPulled", "every image is on the node", now)
    return conditions


def seconds_between(earlier: str, later: str) -> float:
    """Seconds from one status time to another."""
    start, end = (datetime.datetime.strptime(t, TIME_FORMAT) for t in (earlier, later))
    return (end - start).total_seconds()


def _suspend_workload(rec: dict[str, Any], pod: PodView | None, plan: Plan) -> None:
    """spec.runPolicy.suspend: the role's pod goes (a role that succeeded stays done)."""
    if rec["state"] == SUCCEEDED:
        return
    if pod is not None and not pod.deleting and pod.phase != SUCCEEDED:
        plan.delete.append(pod.name)
    rec["state"] = SUSPENDED
    rec["podUID"] = None  # a removal the job asked for: its pod comes back on resume, not as a restart


def plan(
    *,
    workloads: list[Workload],
    pods: dict[str, PodView],
    redis_pod_name: str | None,
    prev: dict[str, Any],
    backoff_limit: int,
    rounds: int,
    output: str,
    now: str,
    progress: Progress | None = None,
    tls: Tls = Tls(),
    outputs: dict[str, str] | None = None,
    storage_classes: tuple[str, ...] = (),
    run_policy: RunPolicy | None = None,
) -> Plan:
    """The next status of one resource and the pod actions that lead there.

    `outputs`: each party's adapters folder, for its record; `storage_classes`: those the job
    names, found in the cluster (condition `Storage`); `run_policy`: spec.runPolicy (suspend, and
    the deadline counted from status.startTime, the job's last start)."""
    status = copy.deepcopy(prev)
    result = Plan(status=status)
    prev_phase = prev.get("phase")
    final = prev_phase in FINAL
    run_policy = run_policy or RunPolicy()
    suspended = run_policy.suspend and not final

    records: dict[str, dict[str, Any]] = {}
    exhausted: list[str] = []
    for w in workloads:
        old = prev.get("scheduler") if w.key == SCHEDULER else (prev.get("parties") or {}).get(w.key)
        rec = records[w.key] = _record(old or {}, w)
        if final:
            pod = pods.get(w.pod_name)
            if pod is not None and not pod.deleting and pod.phase in FINAL:
                rec["state"] = pod.phase
            continue
        if suspended:
            _suspend_workload(rec, pods.get(w.pod_name), result)
        elif _step_workload(rec, pods.get(w.pod_name), w, backoff_limit, result):
            exhausted.append(w.key)

    scheduler = records.pop(SCHEDULER, None)
    if scheduler is not None:  # none here when another organisation hosts the federation
        status["scheduler"] = scheduler
    for key, where in (outputs or {}).items():
        if key in records:
            records[key]["output"] = where
    status["parties"] = records
    status["output"] = output
    conditions = set_condition(prev.get("conditions", []), "SpecValid", "True", "Valid", "spec accepted", now)
    conditions, tls_events = tls_condition(conditions, tls, now)
    if storage_classes:
        found = f"StorageClass {', '.join(storage_classes)} exists"
        conditions = set_condition(conditions, "Storage", "True", "StorageClassFound", found, now)
    elif find_condition(conditions, "Storage") is not None:  # a claim it waited for is free now
        conditions = set_condition(conditions, "Storage", "True", "ClaimsReady", "the job's claims are its own", now)
    for type_ in ("TLS", "Storage"):  # what the job waited for is there: its message goes
        old = find_condition(prev.get("conditions", []), type_)
        if old and old.get("status") == "False" and status.get("message") == old.get("message"):
            status.pop("message")
    result.events += tls_events

    # --- phase ---------------------------------------------------------------------------
    roles = [*([scheduler] if scheduler is not None else []), *records.values()]
    deadline = run_policy.activeDeadlineSeconds
    if final:
        phase = prev_phase
    elif exhausted:
        phase = FAILED
        key = exhausted[0]
        rec = scheduler if key == SCHEDULER else records[key]
        message = f"{describe_failure(key, rec)}; {rec['failures']} failures, backoffLimit {backoff_limit}"
        conditions = set_condition(conditions, FAILED, "True", "BackoffLimitExceeded", message, now)
        status["message"] = message
        result.events.append(("Warning", "BackoffLimitExceeded", message))
    elif all(r["state"] == SUCCEEDED for r in roles):
        phase = SUCCEEDED
        for rec in records.values():  # each party's final global adapter
            if rec.get("output"):
                rec["adapter"] = f"{rec['output']}{checkpoint_name(1.0)}/"
        message = "every local role succeeded" if scheduler is None else "the scheduler and every local party succeeded"
        conditions = set_condition(conditions, SUCCEEDED, "True", "AllSucceeded", message, now)
        status["message"] = f"adapters in {output}"
        result.events.append(("Normal", "Succeeded", f"{message}; adapters in {output}"))
    elif suspended:
        phase = SUSPENDED
        status.pop("startTime", None)  # the deadline counts from the next start
    elif deadline and status.get("startTime") and seconds_between(status["startTime"], now) > deadline:
        phase = FAILED
        message = f"the job ran longer than spec.runPolicy.activeDeadlineSeconds ({deadline} s)"
        conditions = set_condition(conditions, FAILED, "True", "DeadlineExceeded", message, now)
        status["message"] = message
        result.events.append(("Warning", "DeadlineExceeded", message))
    elif any(r["state"] == RUNNING for r in roles) or prev_phase == RUNNING:
        # Once started, a job stays Running while a role restarts or waits for the others.
        phase = RUNNING
    else:
        phase = PENDING
    status["phase"] = phase
    conditions = _images_condition(conditions, status, records, scheduler, pods, redis_pod_name, phase, now, result)
    if phase == RUNNING:
        status.setdefault("startTime", now)
    if phase in FINAL:
        status.setdefault("completionTime", now)
    running = "True" if phase == RUNNING else "False"
    conditions = set_condition(conditions, RUNNING, running, phase, f"job is {phase.lower()}", now)
    conditions = _suspended_condition(conditions, prev_phase, phase, result, now)
    status["conditions"] = conditions

    # --- progress from the runtime -----------------------------------------------------------
    if progress is not None:
        total = progress.rounds or rounds
        done_before = int(str(prev.get("round", "0/0")).split("/")[0] or 0)
        for k in range(done_before + 1, progress.round + 1):  # an Event per round completed since the last pass
            loss = f"; loss {progress.loss:.4f}" if progress.loss is not None and k == progress.round else ""
            result.events.append(("Normal", "RoundCompleted", f"round {k}/{total} aggregated{loss}"))
        status["round"] = f"{progress.round}/{total}"
        if progress.loss is not None:
            status["loss"] = progress.loss
        if progress.eval_loss:  # the global adapter on the parties' valsets: each round, and the last
            status["evalLosses"] = progress.eval_loss
            status["evalLoss"] = progress.eval_loss[-1]["loss"]
        if progress.error and phase != SUCCEEDED:
            status["message"] = progress.error
        if progress.dropouts:
            status["dropouts"] = progress.dropouts
        if progress.privacy is not None:
            status["privacy"] = progress.privacy
        for warning in progress.warnings:  # each once, as a Warning event too
            if warning not in status.setdefault("warnings", []):
                status["warnings"].append(warning)
                result.events.append(("Warning", "JobWarning", warning))
        for name, info in progress.parties.items():
            if name in records:
                records[name].update({k: v for k, v in info.items() if k in ("round", "step", "loss")})
                if info.get("eval_loss") is not None:
                    records[name]["evalLoss"] = info["eval_loss"]
    status.setdefault("round", f"0/{rounds}")

    # --- pods to stop or start ------------------------------------------------------------------
    redis = pods.get(redis_pod_name) if redis_pod_name else None
    if phase in FINAL:
        # A finished job holds no resources: stop whatever still runs (Redis included);
        # finished pods stay for `kubectl logs`.
        result.create.clear()
        result.delete = [p.name for p in pods.values() if not p.deleting and p.phase not in FINAL]
    elif redis_pod_name is None:
        pass  # Redis runs with the remote assist_trainer
    elif redis is None:
        result.create_redis = not suspended  # a suspended job that has not run yet starts nothing
    elif not redis.deleting and redis.phase in FINAL:
        # Redis serves until the job ends; when it stops, start it again (persistence keeps state).
        result.delete.append(redis.name)
        message = f"redis pod {redis.name} ended ({redis.phase}); restarting it"
        result.events.append(("Warning", "RedisRestart", message))
    return result


def _suspended_condition(conditions: list[dict[str, Any]], prev_phase: str | None, phase: str, plan: Plan,
                         now: str) -> list[dict[str, Any]]:
    """Condition `Suspended` and its events, from the moment a job is first suspended."""
    if phase == SUSPENDED:
        if prev_phase != SUSPENDED:
            plan.events.append(("Normal", "Suspended", SUSPENDED_MESSAGE))
        return set_condition(conditions, SUSPENDED, "True", "Suspended", SUSPENDED_MESSAGE, now)
    if prev_phase == SUSPENDED:
        plan.events.append(("Normal", "Resumed", "spec.runPolicy.suspend is false: the job's pods start again"))
        return set_condition(conditions, SUSPENDED, "False", "Resumed", "the job goes on from its last round", now)
    return conditions


# Condition and event of a finished job whose pods and Services its TTL has deleted.
RELEASED, RELEASED_REASON = "Released", "TTLExpired"


def released_message(ttl: int, output: str) -> str:
    return (f"spec.runPolicy.ttlSecondsAfterFinished ({ttl} s) has run out: the job's pods and Services are deleted; "
            f"the adapters stay in {output or 'the output claims'}, and `kubectl delete` removes the rest")


def released(status: dict[str, Any]) -> bool:
    """The job's TTL has run out and its pods and Services were deleted."""
    return (find_condition(status.get("conditions", []), RELEASED) or {}).get("status") == "True"


def released_status(prev: dict[str, Any], message: str, now: str) -> dict[str, Any]:
    status = copy.deepcopy(prev)
    status["conditions"] = set_condition(status.get("conditions", []), RELEASED, "True", RELEASED_REASON, message, now)
    return status


SUSPENDED_MESSAGE = ("spec.runPolicy.suspend is true: the job's pods are removed; Redis, the output claims and the "
                     "Secrets stay, and it goes on from its last round when resumed")
