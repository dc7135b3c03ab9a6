"""The reconciler: reads a FederatedFineTune and its children, makes them match, writes status.

One pass (`Reconciler.reconcile`) is idempotent and safe to repeat at any time:
- it re-reads the resource (never trusts a handler's possibly stale body),
- creates only children that are missing; names are deterministic, so a create that
  races another pass (or a restarted operator) is a 409 and never a duplicate,
- writes the status before acting on pods, so a crash between the two never counts a
  failure twice (see `status.plan`).

The static children (Secrets, ConfigMap, Services, PVCs, NetworkPolicy) are checked on a
job's first pass in this process and again whenever one of them is deleted
(`static_changed`); pod events, the frequent ones, only look at pods.

Secrets are made once and never rewritten: the Redis password and every certificate a
pod was given stay valid across passes and operator restarts. The operator may only get
and create Secrets (never list or update them), so it reads each by name.

Passes for one resource never overlap: a pass requested while one runs marks the job
dirty and the running pass goes round once more (bursts of pod events coalesce).
"""

from __future__ import annotations

import base64
import concurrent.futures
import datetime
import logging
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client

from fedtune.roles import REDIS_PORT
from fedtune.spec import SpecError, parse_job
from fedtune.trust import certs

from . import children, jobs, metrics, podpolicy, status, tls
from .children.networkpolicy import OperatorPeer, operator_peer
from .children.pod import redis_pod, role_pod
from .children.secret import ca_secret, redis_secret, tls_secret
from .jobs import Job, Workload
from .kube import ApiError, Kube, merge_patch, stored
from .progress import read_progress

log = logging.getLogger(__name__)

COMPONENT = "fedtune-operator"
Key = tuple[str, str]  # (namespace, name)


class Retry(Exception):
    """A pass that cannot finish now (e.g. a name held by an object being deleted)."""

    def __init__(self, message: str, delay: float = 5.0) -> None:
        super().__init__(message)
        self.delay = delay


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime(status.TIME_FORMAT)


def owned_by(obj: dict[str, Any], uid: str) -> bool:
    """The child is this job's (its owner, or the job an output claim kept past its owner names)."""
    return uid in jobs.job_uids(obj)


class ClaimTaken(Exception):
    """An output claim's name is held by a claim that outlived an earlier job of the same name (or by
    someone else's): its adapters are never overwritten, so the job waits until it is gone."""


def _as_written(body: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A status as the API server holds it once written: stamped with the generation it was decided from."""
    return stored(status.observed(new, body["metadata"].get("generation")))


def _check_not_kept(manifest: dict[str, Any], found: dict[str, Any] | None) -> None:
    """Refuse to take the name of a claim kept past its owner (an earlier job's adapters) or someone else's."""
    if found is None or manifest["kind"] != "PersistentVolumeClaim" or (found["metadata"].get("ownerReferences")):
        return
    name = found["metadata"]["name"]
    raise ClaimTaken(f"claim {name} already exists and is not this job's (the adapters of an earlier job of this "
                     "name, kept after it was deleted, or someone else's claim): copy what it holds and delete it, "
                     "or give this job another name; the job waits until then")


# Shared by all passes; creates are short, and the API server bounds them anyway. (An
# executor starts its threads on first use, so making it at import costs nothing.)
_POOL = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="fedtune-create")


@dataclass
class _Gate:
    running: bool = False
    dirty: bool = False


@dataclass
class Reconciler:
    api: client.ApiClient
    progress_timeout_s: float = 1.0
    # The operator's own pod (from the chart's env), let through the jobs' NetworkPolicies to Redis.
    operator: OperatorPeer | None = field(default_factory=lambda: operator_peer(dict(os.environ)))
    # The escalating pod template fields this cluster admits (the chart's podTemplate.allow).
    pod_template_allow: frozenset[str] = field(default_factory=lambda: podpolicy.allowed_from_env(os.environ))
    _gates: dict[Key, _Gate] = field(default_factory=dict)
    _mutex: threading.Lock = field(default_factory=threading.Lock)
    _passwords: dict[str, str] = field(default_factory=dict)  # job uid -> Redis password
    _static_ok: set[str] = field(default_factory=set)  # job uids whose static children all exist
    _storage_classes: set[str] = field(default_factory=set)  # StorageClasses seen to exist
    _expiring: set[Key] = field(default_factory=set)  # finished jobs within spec.runPolicy.ttlSecondsAfterFinished
    # Bumped by every deletion seen: a pass that listed before it must not mark the job complete.
    _static_epoch: dict[str, int] = field(default_factory=dict)

    BUSY = "busy"

    def __post_init__(self) -> None:
        self.kube = Kube(self.api)

    # --- entry points ---------------------------------------------------------------------

    def reconcile(self, namespace: str, name: str) -> str | None:
        """Run passes until the job is clean; returns the phase (None once the job is gone).

        Returns `BUSY` when another thread's pass for this job is running: it goes round
        again for this request.
        """
        key = (namespace, name)
        with self._mutex:
            gate = self._gates.setdefault(key, _Gate())
            if gate.running:
                gate.dirty = True
                return self.BUSY
            gate.running = True
        try:
            while True:
                with self._mutex:
                    gate.dirty = False
                phase = self._counted_pass(namespace, name)
                with self._mutex:
                    if not gate.dirty:
                        return phase
        finally:
            with self._mutex:
                gate.running = False

    def _counted_pass(self, namespace: str, name: str) -> str | None:
        """One pass, counted and timed for the operator's metrics."""
        try:
            with metrics.PASS_SECONDS.time():
                phase = self._pass(namespace, name)
        except Retry:
            metrics.PASSES.labels(result="retry").inc()
            raise
        except Exception:
            metrics.PASSES.labels(result="error").inc()
            raise
        metrics.PASSES.labels(result="ok").inc()
        metrics.job_phase(namespace, name, phase)
        return phase

    def static_changed(self, owner_uid: str) -> None:
        """A Service, ConfigMap or PVC of this job went away: check them all on the next pass."""
        with self._mutex:
            self._static_ok.discard(owner_uid)
            self._static_epoch[owner_uid] = self._static_epoch.get(owner_uid, 0) + 1

    def forget(self, namespace: str, name: str, uid: str | None = None) -> None:
        """The resource is gone: drop what this process remembered of it."""
        metrics.job_phase(namespace, name, None)
        with self._mutex:
            self._gates.pop((namespace, name), None)
            self._expiring.discard((namespace, name))
            if uid is not None:
                self._passwords.pop(uid, None)
                self._static_ok.discard(uid)
                self._static_epoch.pop(uid, None)

    # --- one pass -------------------------------------------------------------------------------

    def _pass(self, namespace: str, name: str) -> str | None:
        body = self.kube.get(jobs.KIND, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None  # garbage collection removes the children
        prev = body.get("status") or {}
        document = {
            "apiVersion": body["apiVersion"],
            "kind": body["kind"],
            "metadata": {"name": name, "namespace": namespace},
            "spec": body.get("spec") or {},
        }
        try:
            model = parse_job(document, f"{jobs.PLURAL}/{name}")
        except SpecError as err:
            return self._invalid(body, prev, str(err))
        job = Job(name, namespace, body["metadata"]["uid"], document["spec"], model)
        if self._expired(job, body, prev):
            return prev["phase"]
        problems = children.problems(job, self.pod_template_allow)
        if problems:
            return self._invalid(body, prev, "; ".join(problems))

        if prev.get("phase") not in status.FINAL and job.uid not in self._static_ok:
            try:
                self._ensure_static(job)
            except tls.TlsUnavailable as err:
                return self._wait(body, prev, "TLS", err.reason, str(err))
            except ClaimTaken as err:
                return self._wait(body, prev, "Storage", "OutputClaimTaken", str(err))
        classes = jobs.storage_classes(job)
        if prev.get("phase", status.PENDING) == status.PENDING:
            missing = self._missing_storage_classes(classes)
            if missing:
                message = "; ".join(f"{field} `{name}`: no StorageClass of that name, so the claims wait "
                                    "(and no pod starts) until it exists" for field, name in missing.items())
                return self._wait(body, prev, "Storage", "StorageClassNotFound", message)
        pods = {
            p["metadata"]["name"]: status.pod_view(p)
            for p in self.kube.list("Pod", namespace, jobs.selector(name))
            if owned_by(p, job.uid)
        }
        redis_name = jobs.redis_pod_name(job)
        progress = self._progress(job, pods.get(redis_name) if redis_name else None)
        plan = status.plan(
            workloads=jobs.workloads(job),
            pods=pods,
            redis_pod_name=redis_name,
            prev=prev,
            backoff_limit=job.spec.backoffLimit,
            rounds=len(job.spec.fractions()),
            output=jobs.output_location(job),
            now=now_iso(),
            progress=progress,
            tls=status.Tls(tls.enabled(job), f"Secret {tls.ca_secret_name(job)}"),
            outputs=jobs.party_outputs(job),
            storage_classes=tuple(sorted(set(classes.values()))),
            run_policy=job.spec.runPolicy,
        )
        self._write_status(body, prev, plan.status)
        for pod_name in plan.delete:
            self.kube.delete("Pod", namespace, pod_name)
            log.info("deleted pod %s/%s", namespace, pod_name)
        pods_to_create = [role_pod(job, w) for w in plan.create]
        if plan.create_redis:
            pods_to_create.insert(0, redis_pod(job))
        try:
            self._create_all(pods_to_create)
        except ApiError as err:
            if err.status != 422:
                raise
            # Invalid: e.g. a label or a pod template overlay the Pod API refuses; no retry helps.
            return self._invalid(body, plan.status, f"the API server refuses a pod of this job: {err.message}")
        for type_, reason, message in plan.events:
            self.event(body, type_, reason, message)
        # A job that has just finished: the resync watches its TTL from now.
        self._expired(job, body, _as_written(body, plan.status))
        return plan.status["phase"]

    def _expired(self, job: Job, body: dict[str, Any], current: dict[str, Any]) -> bool:
        """spec.runPolicy.ttlSecondsAfterFinished: release the pods and Services of a job that finished that
        long ago (once); one still within its TTL is remembered, for the resync to look at again."""
        ttl = job.spec.runPolicy.ttlSecondsAfterFinished
        key = (job.namespace, job.name)
        if ttl is None or current.get("phase") not in status.FINAL or not current.get("completionTime"):
            return False
        if status.released(current):
            with self._mutex:
                self._expiring.discard(key)
            return True
        if status.seconds_between(current["completionTime"], now_iso()) < ttl:
            with self._mutex:
                self._expiring.add(key)
            return False
        self._release(job, body, current)
        with self._mutex:
            self._expiring.discard(key)
        return True

    def awaits_ttl(self, namespace: str, name: str) -> bool:
        """A finished job whose TTL has not run out yet."""
        with self._mutex:
            return (namespace, name) in self._expiring

    def _wait(self, body: dict[str, Any], prev: dict[str, Any], condition: str, reason: str, message: str) -> str:
        """Something the job names is missing (its CA Secret, a StorageClass): say so and wait
        (the resync looks again)."""
        new, events = status.waiting_status(prev, condition, reason, message, now_iso())
        self._write_status(body, prev, new)
        for type_, reason, text in events:
            self.event(body, type_, reason, text)
        return new["phase"]

    def _invalid(self, body: dict[str, Any], prev: dict[str, Any], message: str) -> str:
        new = status.invalid_status(prev, message, now_iso())
        if self._write_status(body, prev, new):
            self.event(body, "Warning", "SpecInvalid", message)
        return status.FAILED

    def _write_status(self, body: dict[str, Any], prev: dict[str, Any], new: dict[str, Any]) -> bool:
        """Make the resource's status `new`, as a whole: a key `new` lacks is removed, not kept from
        `prev`. Nothing is sent when it would not change; True when it did."""
        meta = body["metadata"]
        wanted = _as_written(body, new)
        if wanted == prev:
            return False
        self.kube.patch_status(jobs.KIND, meta["namespace"], meta["name"], merge_patch(prev, wanted))
        return True

    # --- children ---------------------------------------------------------------------------------

    def _ensure_static(self, job: Job) -> None:
        """Create the missing static children; remember the job once all are its own."""
        with self._mutex:
            epoch = self._static_epoch.get(job.uid, 0)
        # Side by side: the listings, the Redis Secret, then the certificates in this thread
        # (which uses the pool itself; nothing waits on the pool from inside it).
        kinds = ("ConfigMap", "Service", "PersistentVolumeClaim", "NetworkPolicy")
        listings = [_POOL.submit(self.kube.list, kind, job.namespace, jobs.selector(job.name)) for kind in kinds]
        password = _POOL.submit(self._password, job) if jobs.hosts_federation(job.spec) else None
        self._ensure_tls(job)
        if password is not None:
            password.result()
        existing = {(kind, obj["metadata"]["name"]): obj for kind, f in zip(kinds, listings) for obj in f.result()}
        missing = []
        for manifest in children.plain_children(job, self.operator):
            found = existing.get((manifest["kind"], manifest["metadata"]["name"]))
            if found is None or not owned_by(found, job.uid):
                _check_not_kept(manifest, found)
                missing.append(manifest)
        if not all(self._create_all(missing)):
            # A name is held by an object of an earlier job of the same name that garbage
            # collection has not removed yet: try again shortly.
            raise Retry(f"children of an earlier {job.name} are still being deleted", delay=2.0)
        with self._mutex:
            if self._static_epoch.get(job.uid, 0) == epoch:  # else a deletion raced our listing: look again
                self._static_ok.add(job.uid)

    def _release(self, job: Job, body: dict[str, Any], current: dict[str, Any]) -> None:
        """spec.runPolicy.ttlSecondsAfterFinished has run out: delete the job's pods and Services. The
        resource, its status (where the adapters are) and the claims stay; `kubectl delete` takes the rest."""
        for kind in ("Pod", "Service"):
            for obj in self.kube.list(kind, job.namespace, jobs.selector(job.name)):
                if owned_by(obj, job.uid):
                    self.kube.delete(kind, job.namespace, obj["metadata"]["name"])
        message = status.released_message(job.spec.runPolicy.ttlSecondsAfterFinished or 0, current.get("output", ""))
        self._write_status(body, current, status.released_status(current, message, now_iso()))
        self.event(body, "Normal", status.RELEASED_REASON, message)
        log.info("%s/%s: %s", job.namespace, job.name, message)

    def _password(self, job: Job) -> str:
        """The job's Redis password: a new one in a new Secret, or the stored one."""
        if job.uid in self._passwords:
            return self._passwords[job.uid]
        name = jobs.child_name(job.name, "redis")
        password = secrets.token_urlsafe(24)
        if not self._create(redis_secret(job, password)):
            # Made earlier (by a pass before an operator restart): the stored one counts.
            password = base64.b64decode(self._own_secret(job, name)["data"]["password"]).decode()
        self._passwords[job.uid] = password
        return password

    def _own_secret(self, job: Job, name: str) -> dict[str, Any]:
        """A Secret this job made; Retry while the name is held by an earlier job's being deleted."""
        secret = self.kube.get("Secret", job.namespace, name)
        if secret is None or not owned_by(secret, job.uid):
            raise Retry(f"Secret {name} belongs to an earlier {job.name} that is still being deleted", delay=2.0)
        return secret

    def _ensure_tls(self, job: Job) -> None:
        """Every local role's certificate Secret: the existing ones as they are, the missing ones made.

        A job's first pass makes its CA and every certificate at once. Later passes (after an
        operator restart) read the certificates by name and need the CA only when one is
        missing, so a job whose Secrets all exist runs on even if its named CA has gone.
        """
        if not tls.enabled(job):
            return
        wanted = jobs.workloads(job)
        if tls.generates_ca(job):
            ca = tls.new_ca(job)
            if self._create(ca_secret(job, ca)):
                self._create_certificates(job, wanted, ca)  # a new CA: nothing it signed exists yet
                return
        found = self._map(lambda w: self.kube.get("Secret", job.namespace, tls.role_secret_name(job, w)), wanted)
        for w, secret in zip(wanted, found):
            if secret is not None and not owned_by(secret, job.uid):
                name = tls.role_secret_name(job, w)
                raise Retry(f"Secret {name} belongs to an earlier {job.name} that is still being deleted", delay=2.0)
        missing = [w for w, secret in zip(wanted, found) if secret is None]
        if missing:
            self._create_certificates(job, missing, self._ca(job))

    def _create_certificates(self, job: Job, wanted: list[Workload], ca: certs.Issued) -> None:
        material = tls.new_material(job, wanted, ca)
        if not all(self._create_all([tls_secret(job, w, material) for w in wanted])):
            # Made meanwhile by another pass, or left by an earlier job of this name: look again.
            raise Retry(f"a certificate Secret of {job.name} already exists; checking again", delay=1.0)

    def _ca(self, job: Job) -> certs.Issued:
        """The CA that signs the job's certificates: the user's (spec.tls.caSecret) or the job's own."""
        name = tls.ca_secret_name(job)
        if not tls.generates_ca(job):
            return tls.read_ca(self.kube.get("Secret", job.namespace, name), f"spec.tls.caSecret `{name}`")
        # Made by an earlier pass (before an operator restart): that one signed the others.
        return tls.read_ca(self._own_secret(job, name), f"Secret {name}")

    def _map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        """`fn` over `items` side by side (API reads: one round trip, not one per item)."""
        if len(items) <= 1:
            return [fn(i) for i in items]
        return list(_POOL.map(fn, items))

    def _create_all(self, manifests: list[dict[str, Any]]) -> list[bool]:
        """Create independent children side by side: a pass waits for one round trip, not ten."""
        return self._map(self._create, manifests)

    def _create(self, manifest: dict[str, Any]) -> bool:
        """Create a child; False when its name is taken (by an earlier pass, or an old object)."""
        meta = manifest["metadata"]
        try:
            self.kube.create(manifest)
            log.info("created %s %s/%s", manifest["kind"], meta["namespace"], meta["name"])
            return True
        except ApiError as err:
            if err.status == 403 and "NamespaceTerminating" in err.body:
                # The namespace is going (and the job with it): nothing to recreate.
                log.debug("namespace %s is terminating; not creating %s", meta["namespace"], meta["name"])
                return True
            if err.status != 409:
                raise
            log.debug("%s %s/%s already exists", manifest["kind"], meta["namespace"], meta["name"])
            return False

    def _missing_storage_classes(self, classes: dict[str, str]) -> dict[str, str]:
        """Those of `classes` (field -> name) the cluster lacks. Once found, a class is not asked for
        again; without permission to read StorageClasses (a namespaced install that grants none),
        the claims speak for themselves."""
        missing = {}
        for field_path, name in classes.items():
            if name in self._storage_classes:
                continue
            try:
                found = self.kube.get("StorageClass", None, name)
            except ApiError as err:
                if err.status != 403:
                    raise
                log.warning("cannot read StorageClass %s (%s): not checking it", name, err.message)
                continue
            if found is None:
                missing[field_path] = name
            else:
                self._storage_classes.add(name)
        return missing

    # --- progress and events ------------------------------------------------------------------------

    def _progress(self, job: Job, redis: status.PodView | None) -> status.Progress | None:
        """Ask Redis only when its pod runs and has an address (never in a kubelet-less cluster)."""
        if redis is None or redis.phase != status.RUNNING or not redis.ip or redis.deleting:
            return None
        password = self._passwords.get(job.uid)
        if password is None:
            return None
        host = f"[{redis.ip}]" if ":" in redis.ip else redis.ip
        return read_progress(f"{host}:{REDIS_PORT}", password, job.name, self.progress_timeout_s)

    def event(self, body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """A Kubernetes Event on the resource (`kubectl describe fft` shows them)."""
        meta = body["metadata"]
        stamp = now_iso()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": body["apiVersion"],
                "kind": body["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": COMPONENT,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            self.kube.create(event)
        except ApiError as err:  # events are a courtesy: never fail a pass over one
            log.warning("cannot post event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], err.message)
