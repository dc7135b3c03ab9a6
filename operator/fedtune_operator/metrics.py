"""Prometheus metrics of the operator: reconcile passes (by result), their latency, jobs by phase.

Served by `fedtune-operator --metrics-port` (the chart's `metrics.enabled`). Only the replica
that reconciles counts passes and knows phases; a standby's series stay at zero.
"""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

PASSES = Counter("fedtune_operator_reconciles", "Reconcile passes, by result: ok, retry (a pass that must wait), "
                 "error (the API server failed a call, or a bug).", ["result"])
PASS_SECONDS = Histogram("fedtune_operator_reconcile_duration_seconds", "Wall time of one reconcile pass.",
                         buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
PHASES = ("Pending", "Running", "Succeeded", "Failed")

_lock = threading.Lock()
_phases: dict[tuple[str, str], str] = {}


def job_phase(namespace: str, name: str, phase: str | None) -> None:
    """The phase a pass left a job in (None: the job is gone)."""
    with _lock:
        if phase is None:
            _phases.pop((namespace, name), None)
        else:
            _phases[(namespace, name)] = phase


class _Jobs(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        with _lock:
            counts = Tally(_phases.values())
        family = GaugeMetricFamily("fedtune_operator_jobs", "FederatedFineTune resources by phase.", labels=["phase"])
        for phase in PHASES:
            family.add_metric([phase], counts.get(phase, 0))
        yield family


REGISTRY.register(_Jobs())
