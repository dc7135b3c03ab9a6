"""The terms that protect a party, reduced to one digest that every party compares before any update leaves it.

A party's own job file is its contract: it never adopts settings from the host, it compares them.
The terms are what decides what the others may learn from a party and what it trains:

- `encryption`: the scheme and every setting of it, and the secagg_plus threshold as it applies;
- `privacy`: differential privacy;
- the rounds: `aggregation` (`agg_steps`, `weighting`, a `strategy` when there is one) and the trainer keys
  that decide steps and hence rounds (`num_train_epochs`, `max_steps`) with every other shared trainer key;
- `peft`: the adapter type and its settings; `dataset`: how text becomes tokens;
- the parties: each one's name, role and pinned identity; the job's name.

Local, left out (each party's own business): paths (`input`, `output`, trainsets, valsets, per-party
models), `resources`, `ranks`, `volumes`, scheduling, addresses, `storage`, `image`, `redis`, `runPolicy`,
`backoffLimit`, `workingDir`, `tls` (each party's own revocations), `aggregation.round_timeout_s` (how long
someone waits) and the trainer keys a party may set for itself (`LOCAL_TRAINER_KEYS`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fedtune.spec.job import FederatedFineTune
from fedtune.spec.training import LOCAL_TRAINER_KEYS

LOCAL_AGGREGATION_KEYS = ("round_timeout_s",)


class TermsRefused(Exception):
    """This party's terms differ from another's (or the host tampered with what it relays): it refuses to
    train. Not a ValueError: it has its own exit code (`fedtune.exits.EXIT_REFUSED`)."""


def terms(job: FederatedFineTune) -> dict[str, Any]:
    """The canonical terms of `job` (JSON values, parties keyed by name)."""
    spec = job.spec
    aggregation = {k: v for k, v in spec.aggregation.model_dump(mode="json").items()
                   if k not in LOCAL_AGGREGATION_KEYS}
    trainer = {k: v for k, v in spec.trainer.model_dump(mode="json").items() if k not in LOCAL_TRAINER_KEYS}
    return {
        "job": job.metadata.name,
        "encryption": spec.encryption.model_dump(mode="json", exclude_none=True),
        "threshold": spec.secagg_threshold() if spec.encryption.secagg_plus is not None else None,
        "privacy": spec.privacy.model_dump(mode="json"),
        "aggregation": aggregation,
        "rounds": spec.fractions(),
        "trainer": trainer,
        "peft": spec.peft.model_dump(mode="json", exclude_none=True),
        "dataset": spec.dataset.model_dump(mode="json"),
        "parties": {p.name: {"role": p.role, "identity": p.identity} for p in spec.parties},
    }


def canonical(value: dict[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest_of(value: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(canonical(value)).hexdigest()


def digest(job: FederatedFineTune) -> str:
    """`sha256:<hex>` of the canonical terms."""
    return digest_of(terms(job))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


_ABSENT = object()


def _show(value: Any) -> str:
    return "absent" if value is _ABSENT else json.dumps(value, ensure_ascii=False)


def differences(mine: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """Each field that differs, with both values: `encryption.otp: mine {...}, theirs absent`."""
    a, b = _flatten(mine), _flatten(theirs)
    out = []
    for field in sorted(set(a) | set(b)):
        here, there = a.get(field, _ABSENT), b.get(field, _ABSENT)
        if here != there:
            out.append(f"{field}: mine {_show(here)}, theirs {_show(there)}")
    return out


def refusal(who: str, mine: dict[str, Any], theirs: dict[str, Any]) -> TermsRefused:
    """The error of a party whose terms differ from `who`'s, naming every differing field."""
    found = differences(mine, theirs) or ["(the digests differ)"]
    return TermsRefused(f"refusing to train: {who}'s terms differ from this party's job file: " + "; ".join(found))
