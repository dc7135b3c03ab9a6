"""Leader election over a coordination.k8s.io Lease: of several operator replicas, one reconciles.

The others wait (`acquire`) until the Lease is free or its holder stops renewing it for
`duration_s`; the leader renews it every `renew_s` (`keep`) and, when it cannot (another holder
took it, or the API server did not answer within `duration_s - renew_s`), gives up at once: its
process stops reconciling and exits, and the Deployment starts it again as a standby. A leader
that stops cleanly frees the Lease (`release`), so a standby takes over without waiting.

As client-go does, expiry is judged by this process's own clock: a Lease is free when its record
has not changed for `duration_s` since this process first saw it, whatever the holder's clock says.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import urllib3

from .kube import ApiError, Kube

log = logging.getLogger(__name__)

KIND = "Lease"
# What a call to the API server may raise: its refusal, or no answer at all.
_UNANSWERED = (ApiError, urllib3.exceptions.HTTPError, OSError)


def _micro_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class LeaseElector:
    kube: Kube
    namespace: str
    name: str
    identity: str
    duration_s: float = 15.0
    renew_s: float = 5.0
    retry_s: float = 2.0
    _seen: tuple[Any, ...] | None = field(default=None, init=False)
    _seen_at: float = field(default=0.0, init=False)

    # --- taking the Lease ----------------------------------------------------------------------

    def acquire(self, stop: threading.Event) -> bool:
        """Block until this process holds the Lease (True), or `stop` is set (False)."""
        waiting_logged = False
        while not stop.is_set():
            try:
                if self._try_acquire():
                    log.info("leader election: %s leads (Lease %s/%s)", self.identity, self.namespace, self.name)
                    return True
            except _UNANSWERED as err:  # the API server is unreachable or refused: try again
                log.warning("leader election: %s", err)
            if not waiting_logged:
                log.info("leader election: %s waits for Lease %s/%s", self.identity, self.namespace, self.name)
                waiting_logged = True
            stop.wait(self.retry_s)
        return False

    def _try_acquire(self) -> bool:
        lease = self.kube.get(KIND, self.namespace, self.name)
        if lease is None:
            return self._write(self._manifest(transitions=0), create=True)
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        if holder == self.identity:
            return self._write(self._renewed(lease))
        if holder and not self._expired(spec):
            return False
        taken = self._manifest(transitions=int(spec.get("leaseTransitions") or 0) + 1)
        taken["metadata"]["resourceVersion"] = lease["metadata"]["resourceVersion"]
        return self._write(taken)

    def _expired(self, spec: dict[str, Any]) -> bool:
        record = (spec.get("holderIdentity"), spec.get("renewTime"), spec.get("leaseTransitions"))
        if record != self._seen:
            self._seen, self._seen_at = record, time.monotonic()
        duration = float(spec.get("leaseDurationSeconds") or self.duration_s)
        return time.monotonic() - self._seen_at > duration

    # --- holding it ----------------------------------------------------------------------------

    def keep(self, lost: Callable[[], None], stop: threading.Event) -> threading.Thread:
        """Renew the Lease until `stop` is set; call `lost` (once) when it cannot be kept."""

        def renew_loop() -> None:
            renewed = time.monotonic()
            while not stop.wait(self.renew_s):
                try:
                    if not self._renew():
                        log.error("leader election: Lease %s/%s was taken over; stopping", self.namespace, self.name)
                        lost()
                        return
                    renewed = time.monotonic()
                except _UNANSWERED as err:
                    if time.monotonic() - renewed > self.duration_s - self.renew_s:
                        log.error("leader election: cannot renew Lease %s/%s (%s); stopping", self.namespace,
                                  self.name, err)
                        lost()
                        return
                    log.warning("leader election: renewing failed, trying again: %s", err)

        thread = threading.Thread(target=renew_loop, name="fedtune-lease", daemon=True)
        thread.start()
        return thread

    def _renew(self) -> bool:
        lease = self.kube.get(KIND, self.namespace, self.name)
        if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
            return False
        return self._write(self._renewed(lease))

    def release(self) -> None:
        """Free the Lease (when this process holds it), so a standby takes over without waiting."""
        try:
            lease = self.kube.get(KIND, self.namespace, self.name)
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            lease["spec"].update(holderIdentity="", leaseDurationSeconds=1, renewTime=_micro_now())
            self._write(lease)
            log.info("leader election: %s released Lease %s/%s", self.identity, self.namespace, self.name)
        except _UNANSWERED as err:
            log.warning("leader election: could not release the Lease (it expires by itself): %s", err)

    # --- the object ----------------------------------------------------------------------------

    def _manifest(self, transitions: int) -> dict[str, Any]:
        now = _micro_now()
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": KIND,
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": int(self.duration_s),
                     "acquireTime": now, "renewTime": now, "leaseTransitions": transitions},
        }

    def _renewed(self, lease: dict[str, Any]) -> dict[str, Any]:
        lease["spec"].update(renewTime=_micro_now(), leaseDurationSeconds=int(self.duration_s))
        return lease

    def _write(self, lease: dict[str, Any], create: bool = False) -> bool:
        """Create or replace the Lease; False when someone else wrote it first (a 409)."""
        try:
            if create:
                self.kube.create(lease)
            else:
                self.kube.replace(lease)
        except ApiError as err:
            if err.status == 409:
                return False
            raise
        return True
