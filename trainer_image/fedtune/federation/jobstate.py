"""A job's state in Redis: phase, rounds, per-party progress, metrics and the aggregation blobs.

Every role keeps what it must survive a restart here, so any of them (the scheduler
included) can be killed and started again and carry on. All keys of one job share the
prefix `fedtune:<job_id>:`. Imports no torch: the operator reads status through it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

PHASES = ("Pending", "Running", "Succeeded", "Failed")
LOST = "lost"  # a party's state once its launcher gives up on it (a secagg_plus label_trainer out of restarts)
# A secagg_plus label_trainer that missed the rounds from `dropped_from` to the last (frozen, or never
# answering): the job ends without it.
DROPPED = "dropped"
FINISHED = ("succeeded", LOST, DROPPED)  # the party states the job's end waits for


@dataclass
class PartyStatus:
    name: str
    role: str = ""
    state: str = "pending"
    round: int = 0
    step: int = 0
    max_steps: int = 0
    samples: int = 0
    loss: float | None = None
    eval_loss: float | None = None  # the last global adapter's loss on this party's valset
    error: str = ""
    dropped_from: int = 0  # state `dropped`: the first of the rounds it missed up to the last
    updated: float = 0.0


@dataclass
class JobStatus:
    job_id: str
    phase: str = "Pending"
    round: int = 0
    rounds: int = 0
    loss: float | None = None
    # The global adapter's loss on the parties' valsets, by round: [{"round": k, "loss": x}], the parties'
    # losses averaged by their number of validation instances.
    eval_loss: list[dict[str, float]] = field(default_factory=list)
    error: str = ""
    warnings: list[str] = field(default_factory=list)
    parties: dict[str, PartyStatus] = field(default_factory=dict)
    # secagg_plus: round -> the label_trainers that round completed without
    dropouts: dict[str, list[str]] = field(default_factory=dict)
    # privacy.dp: ε for δ so far, and what it was computed from (`fedtune.privacy.report`)
    privacy: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> JobStatus:
        data = json.loads(text)
        data["parties"] = {k: PartyStatus(**v) for k, v in data.get("parties", {}).items()}
        return cls(**data)


def redis_client(address: str, password: str | None, *, timeout_s: float = 10.0, retries: bool = True) -> redis.Redis:
    """A client for `host:port` (`[v6]:port` too). Without `retries`, a failed call fails at once."""
    host, _, port = address.rpartition(":")
    options: dict[str, Any] = {"retry": Retry(NoBackoff(), 0)} if not retries else {}
    return redis.Redis(
        host=host.strip("[]") or "127.0.0.1",
        port=int(port),
        password=password or None,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        **options,
    )


class JobState:
    def __init__(self, client: redis.Redis, job_id: str) -> None:
        self.r = client
        self.job_id = job_id
        self.prefix = f"fedtune:{job_id}:"

    @classmethod
    def connect(cls, address: str, password: str | None, job_id: str, *, timeout_s: float = 10.0,
                wait_s: float = 0.0) -> JobState:
        """The job's state at Redis `address`; with `wait_s`, once Redis answers within that long (a role's pod
        may start before Redis's, or before its Service name resolves). A wrong password fails at once."""
        state = cls(redis_client(address, password, timeout_s=timeout_s), job_id)
        deadline = time.monotonic() + wait_s
        while wait_s:
            try:
                state.r.ping()
                break
            except redis.AuthenticationError:
                raise
            except (redis.ConnectionError, redis.TimeoutError) as err:
                if time.monotonic() > deadline:
                    raise redis.ConnectionError(f"Redis at {address} did not answer within {wait_s:g} s: "
                                                f"{err}") from None
                log.info("waiting for Redis at %s: %s", address, err)
                time.sleep(1.0)
        return state

    def _k(self, *parts: object) -> str:
        return self.prefix + ":".join(str(p) for p in parts)

    # --- job -----------------------------------------------------------------------------

    def init(self, rounds: int, parties: dict[str, str]) -> None:
        """First start only: a restarted scheduler keeps what is there."""
        if self.r.set(self._k("rounds"), rounds, nx=True):
            self.r.set(self._k("phase"), "Pending")
            self.r.set(self._k("started"), time.time())
        for name, role in parties.items():
            self.r.hsetnx(self._k("party", name), "role", json.dumps(role))
        self.r.sadd(self._k("parties"), *parties)

    def phase(self) -> str:
        value = self.r.get(self._k("phase"))
        return value.decode() if value else "Pending"

    def error(self) -> str:
        value = self.r.get(self._k("error"))
        return value.decode() if value else ""

    def set_phase(self, phase: str, error: str = "") -> None:
        assert phase in PHASES, phase
        if self.phase() in ("Succeeded", "Failed"):
            return  # a finished job stays finished
        if error:
            self.r.set(self._k("error"), error)
        self.r.set(self._k("phase"), phase)
        if phase in ("Succeeded", "Failed"):
            self.r.set(self._k("finished"), time.time())

    def reopen(self) -> None:
        """A resumed run: a job that failed (or whose launcher timed out) runs again from its last round."""
        if self.phase() == "Failed":
            self.r.delete(self._k("error"), self._k("finished"))
            self.r.set(self._k("phase"), "Running" if self.get_json("start") else "Pending")

    def add_warning(self, message: str) -> None:
        if message.encode() not in self.r.lrange(self._k("warnings"), 0, -1):
            self.r.rpush(self._k("warnings"), message)

    def set_json(self, name: str, value: Any) -> None:
        self.r.set(self._k("doc", name), json.dumps(value))

    def get_json(self, name: str) -> Any:
        value = self.r.get(self._k("doc", name))
        return json.loads(value) if value else None

    # --- parties -------------------------------------------------------------------------

    def update_party(self, name: str, **fields: Any) -> None:
        fields["updated"] = time.time()
        self.r.hset(self._k("party", name), mapping={k: json.dumps(v) for k, v in fields.items()})

    def party(self, name: str) -> PartyStatus:
        raw = self.r.hgetall(self._k("party", name))
        status = PartyStatus(name=name)
        for key, value in raw.items():
            if hasattr(status, key.decode()):
                setattr(status, key.decode(), json.loads(value))
        return status

    def party_names(self) -> list[str]:
        return sorted(n.decode() for n in self.r.smembers(self._k("parties")))

    def append_metric(self, name: str, record: dict[str, Any]) -> None:
        self.r.rpush(self._k("metrics", name), json.dumps(record))

    def metrics(self, name: str) -> list[dict[str, Any]]:
        return [json.loads(v) for v in self.r.lrange(self._k("metrics", name), 0, -1)]

    def put_eval(self, round_: int, party: str, loss: float, samples: int) -> None:
        self.r.hset(self._k("eval", round_), party, json.dumps([loss, samples]))

    def eval_losses(self, rounds: int) -> list[dict[str, float]]:
        """Each evaluated round's loss over every party's valset (weighted by their instances)."""
        pipe = self.r.pipeline(transaction=False)
        for round_ in range(rounds + 1):
            pipe.hgetall(self._k("eval", round_))
        out = []
        for round_, found in enumerate(pipe.execute()):
            pairs = [json.loads(v) for v in found.values()]
            samples = sum(n for _, n in pairs)
            if samples:
                out.append({"round": round_, "loss": sum(loss * n for loss, n in pairs) / samples})
        return out

    # --- aggregation blobs -----------------------------------------------------------------

    def put_update(self, round_: int, party: str, blob: bytes) -> None:
        self.r.hset(self._k("updates", round_), party, blob)

    def updates(self, round_: int) -> dict[str, bytes]:
        return {k.decode(): v for k, v in self.r.hgetall(self._k("updates", round_)).items()}

    def submitted(self, round_: int) -> set[str]:
        return {k.decode() for k in self.r.hkeys(self._k("updates", round_))}

    def put_global(self, round_: int, blob: bytes, strategy_state: bytes | None = None) -> None:
        """The round's global adapter and the strategy's state after it (a server optimizer's moments); its
        updates (and secagg_plus signatures and reveals) and the strategy's state before it are dropped in the
        same transaction. The split stays: an answer that comes late is told it is no longer needed."""
        pipe = self.r.pipeline(transaction=True)
        pipe.set(self._k("global", round_), blob)
        if strategy_state is not None:
            pipe.set(self._k("strategy", round_), strategy_state)
        if round_ > 0:
            pipe.delete(self._k("updates", round_), self._k("reveals", round_), self._k("signatures", round_),
                        self._k("signers", round_), self._k("strategy", round_ - 1))
            pipe.set(self._k("round"), round_)
        pipe.execute()

    def get_global(self, round_: int) -> bytes | None:
        return self.r.get(self._k("global", round_))

    def get_strategy_state(self, round_: int) -> bytes | None:
        """The strategy's state after round `round_` (None before its first step, or for one that keeps none)."""
        return self.r.get(self._k("strategy", round_))

    def completed_round(self) -> int:
        value = self.r.get(self._k("round"))
        return int(value) if value else 0

    # --- secagg_plus: encrypted shares, each round's split into uploaded and dropped, reveals ------

    def put_shares(self, party: str, blob: bytes) -> None:
        """A label_trainer's encrypted shares; the first ones stay (a restarted party sends the same again)."""
        self.r.hsetnx(self._k("shares"), party, blob)

    def shares(self) -> dict[str, bytes]:
        return {k.decode(): v for k, v in self.r.hgetall(self._k("shares")).items()}

    def share_senders(self) -> set[str]:
        return {k.decode() for k in self.r.hkeys(self._k("shares"))}

    def set_split(self, round_: int, uploaded: list[str], dropped: list[str]) -> dict[str, list[str]]:
        """Fix which label_trainers a round sums; once set it never changes. Returns the split in force."""
        split = {"uploaded": sorted(uploaded), "dropped": sorted(dropped)}
        if self.r.set(self._k("split", round_), json.dumps(split), nx=True) and dropped:
            self.r.hset(self._k("dropouts"), str(round_), json.dumps(split["dropped"]))
        return self.split(round_) or split

    def split(self, round_: int) -> dict[str, list[str]] | None:
        value = self.r.get(self._k("split", round_))
        return json.loads(value) if value else None

    def put_signature(self, round_: int, party: str, signature: bytes) -> None:
        """A survivor's signature over the round's split; the first one stays (a retry sends the same)."""
        self.r.hsetnx(self._k("signatures", round_), party, signature)

    def signed(self, round_: int, party: str) -> bool:
        return bool(self.r.hexists(self._k("signatures", round_), party))

    def signatures(self, round_: int) -> dict[str, bytes]:
        return {k.decode(): v for k, v in self.r.hgetall(self._k("signatures", round_)).items()}

    def fix_signers(self, round_: int, signatures: dict[str, bytes]) -> dict[str, bytes]:
        """Fix whose signatures go out with the round's reveal requests; once set it never changes."""
        self.r.set(self._k("signers", round_), json.dumps({p: s.hex() for p, s in signatures.items()}), nx=True)
        return self.signers(round_) or signatures

    def signers(self, round_: int) -> dict[str, bytes] | None:
        value = self.r.get(self._k("signers", round_))
        return {p: bytes.fromhex(s) for p, s in json.loads(value).items()} if value else None

    def dropouts(self) -> dict[str, list[str]]:
        """Round (as text) -> the label_trainers it completed without."""
        return {k.decode(): json.loads(v) for k, v in self.r.hgetall(self._k("dropouts")).items()}

    def put_reveal(self, round_: int, party: str, blob: bytes) -> None:
        """A survivor's shares; the first ones stay (a party answers a repeated request with the same)."""
        self.r.hsetnx(self._k("reveals", round_), party, blob)

    def reveals(self, round_: int) -> dict[str, bytes]:
        return {k.decode(): v for k, v in self.r.hgetall(self._k("reveals", round_)).items()}

    def revealed(self, round_: int, party: str) -> bool:
        return bool(self.r.hexists(self._k("reveals", round_), party))

    # --- reading it all --------------------------------------------------------------------

    def snapshot(self) -> JobStatus:
        rounds = self.r.get(self._k("rounds"))
        status = JobStatus(
            job_id=self.job_id,
            phase=self.phase(),
            round=self.completed_round(),
            rounds=int(rounds) if rounds else 0,
            error=self.error(),
            warnings=[w.decode() for w in self.r.lrange(self._k("warnings"), 0, -1)],
            parties={name: self.party(name) for name in self.party_names()},
            dropouts=self.dropouts(),
            privacy=self.get_json("privacy"),
        )
        losses = [p.loss for p in status.parties.values() if p.loss is not None]
        aggregate = self.metrics("aggregate_loss")  # privacy.losses aggregate: only the parties' mean
        status.loss = sum(losses) / len(losses) if losses else (aggregate[-1]["loss"] if aggregate else None)
        status.eval_loss = self.eval_losses(status.rounds)
        return status
