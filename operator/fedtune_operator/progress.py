"""Round and loss of a running job, read from the runtime's job state in Redis.

Best effort by design: Redis may not be up yet, may be restarting, or (in the cluster
tests, with no kubelet) never run at all. A read never blocks a handler for longer than
`timeout_s`; a failed read returns None and the status keeps its last known values.
"""

from __future__ import annotations

import concurrent.futures
import logging
from dataclasses import asdict

from fedtune.federation.jobstate import JobState, redis_client

from .status import Progress

log = logging.getLogger(__name__)

# A few threads at most: a read stuck in connect() occupies one until its socket times out.
# (An executor starts its threads on first use, so making it at import costs nothing.)
_POOL = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="fedtune-progress")


def _snapshot(address: str, password: str, job_id: str, timeout_s: float) -> Progress:
    # No retries: the next reconcile pass is the retry, and a pass must not wait on this one.
    client = redis_client(address, password, timeout_s=timeout_s, retries=False)
    try:
        snap = JobState(client, job_id).snapshot()
    finally:
        client.close()
    parties = {name: asdict(p) for name, p in snap.parties.items()}
    return Progress(round=snap.round, rounds=snap.rounds, loss=snap.loss, error=snap.error, parties=parties,
                    dropouts=snap.dropouts, privacy=snap.privacy, warnings=snap.warnings,
                    eval_loss=snap.eval_loss)


def read_progress(address: str, password: str, job_id: str, timeout_s: float = 1.0) -> Progress | None:
    """The job's progress, or None when Redis cannot answer within `timeout_s`."""
    future = _POOL.submit(_snapshot, address, password, job_id, timeout_s)
    try:
        return future.result(timeout=timeout_s * 2)
    except concurrent.futures.TimeoutError:
        log.debug("job state of %s: redis at %s did not answer in time", job_id, address)
    except Exception as err:  # any Redis or decoding error: keep the last known status
        log.debug("job state of %s: cannot read redis at %s: %s", job_id, address, err)
    return None
