"""The contract between a launcher (`fedtune run`, the operator) and the roles it starts.

A launcher starts every role from the same job file with `fedtune <subcommand>`, passes
secrets and settings through the environment, and fills in the addresses the roles dial
(they are not known until the launcher picks hosts and ports). This module says how, once:
the role names, each role's subcommand and default gRPC port, the environment variables a
role reads, the command line, and where the addresses go in the spec.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

SCHEDULER = "scheduler"
ASSIST_TRAINER = "assist_trainer"
LABEL_TRAINER = "label_trainer"

# The CLI subcommand of each role (`fedtune <subcommand>`).
SUBCOMMANDS = {SCHEDULER: "scheduler", ASSIST_TRAINER: "assist-trainer", LABEL_TRAINER: "label-trainer"}
# Default gRPC ports: the scheduler and the assist_trainer serve; a label_trainer only calls out.
PORTS = {SCHEDULER: 55005, ASSIST_TRAINER: 55004, LABEL_TRAINER: 55006}
REDIS_PORT = 6379
# The roles that keep state in Redis and so read its password; label_trainers only speak gRPC.
REDIS_ROLES = (SCHEDULER, ASSIST_TRAINER)
REDIS_WAIT_S = 120.0  # how long those roles wait for Redis to answer at start (its pod may come up later)

# What a role reads from its environment.
REDIS_PASSWORD_ENV = "FEDTUNE_REDIS_PASSWORD"
TLS_DIR_ENV = "FEDTUNE_TLS_DIR"  # a folder holding ca.crt, tls.crt, tls.key (the default of --tls-dir)
TORCH_THREADS_ENV = "FEDTUNE_TORCH_THREADS"  # a training party's torch threads (its share of the CPUs)
LOG_LEVEL_ENV = "FEDTUNE_LOG_LEVEL"
CACHE_DIR_ENV = "FEDTUNE_CACHE_DIR"  # where a party caches tokenised datasets (fedtune.train.tokencache)
METRICS_PORT_ENV = "FEDTUNE_METRICS_PORT"  # serve Prometheus metrics on this port (`fedtune.federation.metrics`)
METRICS_PORT = 9090  # the port the operator gives every role pod
PARTY_ENV = "FEDTUNE_PARTY"  # which party a process is, for people and tools looking at it (logs, `kubectl exec`)


def uses_redis(role: str) -> bool:
    return role in REDIS_ROLES


def role_argv(role: str, job_file: str | Path, *, party: str | None, base_dir: str | Path,
              output: str | Path | None = None, output_dir: str | Path | None = None, log_level: str | None = None,
              listen: str | None = None, tls_dir: str | Path | None = None, insecure: bool = False) -> list[str]:
    """The arguments after `fedtune` that run one role (the scheduler takes no party). A party writes
    its adapters to `output`/<party>, or to exactly `output_dir`. A role refuses to start without TLS
    material (`tls_dir`, or $FEDTUNE_TLS_DIR) unless `insecure`."""
    argv = ["--log-level", log_level] if log_level else []
    argv += [SUBCOMMANDS[role], "--job", str(job_file)]
    if party is not None:
        argv += ["--party", party]
    argv += ["--base-dir", str(base_dir)]
    if output_dir is not None:
        argv += ["--output-dir", str(output_dir)]
    elif output is not None:
        argv += ["--output", str(output)]
    if listen is not None:
        argv += ["--listen", listen]
    if tls_dir is not None:
        argv += ["--tls-dir", str(tls_dir)]
    if insecure:
        argv.append("--insecure")
    return argv


def listen_address(role: str, address: str | None = None) -> str:
    """Where a role serves unless told otherwise: every interface, on the port of its spec address
    (or its default port)."""
    port = address.rpartition(":")[2] if address else str(PORTS[role])
    return f"[::]:{port}"


def with_addresses(spec: dict[str, Any], *, scheduler: str | None = None, redis: str | None = None,
                   parties: dict[str, str] | None = None) -> dict[str, Any]:
    """A copy of a spec mapping with the addresses the roles dial: `scheduler.address`,
    `redis.address` and `parties[].address` (by party name); what is not given stays as it is."""
    out = copy.deepcopy(spec)
    if scheduler is not None:
        out.setdefault("scheduler", {})["address"] = scheduler
    if redis is not None:
        out.setdefault("redis", {})["address"] = redis
    for party in out.get("parties", []):
        if party.get("name") in (parties or {}):
            party["address"] = parties[party["name"]]  # type: ignore[index]
    return out
