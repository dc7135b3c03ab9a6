"""Prometheus metrics of a running role, served on the port a launcher names (`roles.METRICS_PORT_ENV`).

The operator gives every role pod a port (`roles.METRICS_PORT`); `fedtune run` gives none, as its
roles share one host. Metrics are a courtesy: a port that cannot be served is logged and left,
and nothing a role does waits on them.

Each series carries the party it is about: a party's own, and, at the scheduler, every party's
round and loss as they report them (one scrape shows the whole job).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from fedtune import roles

log = logging.getLogger(__name__)

_PARTY = ["party"]
ROUND = Gauge("fedtune_round", "Aggregation rounds the party has completed.", _PARTY)
ROUNDS = Gauge("fedtune_rounds", "Aggregation rounds of the job.", _PARTY)
TRAIN_LOSS = Gauge("fedtune_train_loss", "The party's last training loss.", _PARTY)
EVAL_LOSS = Gauge("fedtune_eval_loss", "The latest global adapter's loss on the party's valset (absent without "
                  "one).", _PARTY)
ROUND_SECONDS = Histogram(
    "fedtune_round_duration_seconds", "Wall time of a round at the party: from the previous global adapter "
    "to this one (training, exchange, waiting).", _PARTY, buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200))
WAIT_SECONDS = Histogram(
    "fedtune_aggregation_wait_seconds", "From submitting the party's update to holding the global adapter: "
    "mostly waiting for the other parties.", _PARTY, buckets=(0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800))
SECAGG_SECONDS = Histogram(
    "fedtune_secure_aggregation_seconds", "Time spent encoding and masking an update (protect) or combining "
    "and unmasking a round (combine).", [*_PARTY, "step"], buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300))
BYTES_SENT = Counter("fedtune_sent_bytes", "Adapter bytes sent: updates submitted, global adapters served.", _PARTY)
BYTES_RECEIVED = Counter("fedtune_received_bytes", "Adapter bytes received: updates collected, global adapters "
                         "fetched.", _PARTY)


_me = ""  # the party (or `scheduler`) this process is: the label of its own series


def mine(metric: Gauge | Counter | Histogram, **labels: str) -> Any:
    """This process's own series of `metric`."""
    return metric.labels(party=_me, **labels)


def port_from_env() -> int | None:
    value = os.environ.get(roles.METRICS_PORT_ENV, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def serve(me: str, port: int | None = None) -> bool:
    """Label this process's series `me` and serve /metrics on `port` (default: from the environment);
    False when none is served."""
    global _me
    _me = me
    port = port_from_env() if port is None else port
    if not port:
        return False
    try:
        start_http_server(port)
    except OSError as err:  # taken, or not ours to bind: the job goes on without metrics
        log.warning("metrics: cannot serve on port %d (%s); carrying on without them", port, err)
        return False
    log.info("metrics on port %d (/metrics)", port)
    return True


@contextmanager
def timed(histogram: Any) -> Iterator[None]:
    """Observe the wall time of the block into `histogram` (a labelled child)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        histogram.observe(time.perf_counter() - start)
