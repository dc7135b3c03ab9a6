"""kopf handlers: thin triggers for `Reconciler.reconcile`.

- FederatedFineTune created, resumed (operator start) or updated -> reconcile it.
- A pod of a job changed or vanished -> reconcile its job (pods carry `fedtune.io/job`).
- A Service, ConfigMap, claim or NetworkPolicy of a job was deleted -> reconcile its job,
  which makes it again.
- Every `FEDTUNE_RESYNC_SECONDS` the unfinished jobs are reconciled once more: that
  mirrors round and loss from Redis, which sends no Kubernetes events, and watches
  activeDeadlineSeconds; finished jobs with a ttlSecondsAfterFinished stay until it releases their
  pods and Services.

No handler needs a finalizer (no timers, daemons or mandatory delete handlers): children
go with their owner through garbage collection (the output claims, which have none, stay),
so deleting a resource works even when the operator is not running.

Run with `fedtune-operator` (see `main.py`) or `kopf run -m fedtune_operator.handlers`.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, ClassVar

import kopf

from . import status
from .jobs import GROUP, LABEL_JOB, LABEL_PART_OF, PART_OF, PLURAL, VERSION, job_uids
from .kube import ApiError, api_client
from .reconcile import Reconciler, Retry

log = logging.getLogger(__name__)

FFT = (GROUP, VERSION, PLURAL)
POD_LABELS = {LABEL_PART_OF: PART_OF, LABEL_JOB: kopf.PRESENT}


class _State:
    """The operator process's shared state (one reconciler, the jobs it knows)."""

    reconciler: Reconciler | None = None
    jobs: ClassVar[set[tuple[str, str]]] = set()
    lock = threading.Lock()
    stop = threading.Event()
    resync: threading.Thread | None = None


def _reconciler() -> Reconciler:
    if _State.reconciler is None:
        _State.reconciler = Reconciler(api_client())
    return _State.reconciler


def _track(namespace: str, name: str, phase: str | None) -> None:
    finished = phase in status.FINAL and not _reconciler().awaits_ttl(namespace, name)
    with _State.lock:
        if phase is None or finished:
            _State.jobs.discard((namespace, name))
        else:
            _State.jobs.add((namespace, name))


def _run(namespace: str, name: str) -> None:
    try:
        phase = _reconciler().reconcile(namespace, name)
    except Retry as err:
        raise kopf.TemporaryError(str(err), delay=err.delay) from None
    except ApiError as err:
        # The API server refused or failed a call (overload, quota, a webhook): retry soon.
        raise kopf.TemporaryError(f"{err.status} {err.reason}: {err.message}", delay=5) from None
    if phase != Reconciler.BUSY:
        _track(namespace, name, phase)


def _resync_loop(interval: float) -> None:
    while not _State.stop.wait(interval):
        with _State.lock:
            jobs = sorted(_State.jobs)
        for namespace, name in jobs:
            try:
                phase = _reconciler().reconcile(namespace, name)
                if phase != Reconciler.BUSY:
                    _track(namespace, name, phase)
            except Exception as err:  # keep resyncing the others
                log.warning("resync of %s/%s failed: %s", namespace, name, err)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Keep kopf's bookkeeping in annotations: `status` is ours alone.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="fedtune.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="fedtune.io", key="last-handled")
    settings.posting.level = logging.WARNING  # handler chatter is not worth an Event
    # The resources are known and installed with the chart: no need to watch CRDs or
    # namespaces, hence no cluster-wide read permissions for them (least privilege).
    settings.scanning.disabled = True
    settings.execution.max_workers = int(os.environ.get("FEDTUNE_OPERATOR_WORKERS", "16"))
    timeout = os.environ.get("FEDTUNE_WATCH_TIMEOUT")
    if timeout:  # tests: short watch requests, so a stopping operator does not hang
        settings.watching.server_timeout = int(timeout)
        settings.watching.client_timeout = int(timeout) + 5
    _State.stop.clear()
    _reconciler()
    interval = float(os.environ.get("FEDTUNE_RESYNC_SECONDS", "10"))
    _State.resync = threading.Thread(target=_resync_loop, args=(interval,), name="fedtune-resync", daemon=True)
    _State.resync.start()


@kopf.on.cleanup()
def shutdown(**_: Any) -> None:
    _State.stop.set()
    if _State.resync is not None:
        _State.resync.join(timeout=10)
    _State.resync = None
    _State.reconciler = None
    with _State.lock:
        _State.jobs.clear()


@kopf.on.create(*FFT)
@kopf.on.resume(*FFT)
@kopf.on.update(*FFT)
def reconcile_job(namespace: str, name: str, **_: Any) -> None:
    _run(namespace, name)


@kopf.on.event(*FFT)
def forget_deleted_job(event: dict[str, Any], body: kopf.Body, namespace: str, name: str, **_: Any) -> None:
    if event.get("type") == "DELETED":
        _track(namespace, name, None)
        _reconciler().forget(namespace, name, body["metadata"].get("uid"))


def _run_for_child(body: kopf.Body, namespace: str) -> None:
    job = body["metadata"]["labels"][LABEL_JOB]
    try:
        _run(namespace, job)
    except kopf.TemporaryError as err:
        log.info("job %s/%s: %s (the resync retries)", namespace, job, err)


@kopf.on.event("", "v1", "pods", labels=POD_LABELS)
def pod_changed(body: kopf.Body, namespace: str, **_: Any) -> None:
    _run_for_child(body, namespace)


@kopf.on.event("", "v1", "services", labels=POD_LABELS)
@kopf.on.event("", "v1", "configmaps", labels=POD_LABELS)
@kopf.on.event("", "v1", "persistentvolumeclaims", labels=POD_LABELS)
@kopf.on.event("networking.k8s.io", "v1", "networkpolicies", labels=POD_LABELS)
def static_child_changed(event: dict[str, Any], body: kopf.Body, namespace: str, **_: Any) -> None:
    """Someone deleted a Service, ConfigMap, claim or NetworkPolicy of a job: make it again."""
    if event.get("type") != "DELETED":
        return
    for uid in job_uids(dict(body)):
        _reconciler().static_changed(uid)
    _run_for_child(body, namespace)
