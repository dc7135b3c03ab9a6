"""The scheduler role: parties join and compare terms, start together, report progress.

The scheduler relays; it decides nothing a party must trust. Each party compares the scheduler's terms
with its own job file at Join, and checks every peer's signed key bundle (with its nonce and terms
digest) in the Ready answer itself (`fedtune.federation.party`).

All of its state lives in Redis (`fedtune.federation.jobstate`), so a restarted scheduler carries on
where the last one stopped. Calls that wait (Join, Ready) are long polls bounded by the
caller's `wait_s`, never open-ended.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from fedtune.federation import metrics, strategy, transport
from fedtune.federation.jobstate import DROPPED, FINISHED, JobState
from fedtune.federation.proto import fedtune_pb2 as pb
from fedtune.federation.proto import fedtune_pb2_grpc as pb_grpc
from fedtune.roles import SCHEDULER
from fedtune.spec import FederatedFineTune, JobSpec
from fedtune.spec import terms as job_terms

log = logging.getLogger(__name__)

T = TypeVar("T")
_MAX_POLL_S = 30.0
_TICK_S = 0.5  # how often a waiting call looks at Redis for what other processes changed (a job failed)


class SchedulerService(pb_grpc.SchedulerServicer):
    def __init__(self, job: FederatedFineTune, state: JobState, identity: transport.PeerIdentity | None = None) -> None:
        self.job = job
        self.state = state
        self.identity = identity
        self.roles = {p.name: p.role for p in job.spec.parties}
        self.rounds = len(job.spec.fractions())
        self.terms = job_terms.terms(job)
        self.lock = threading.Lock()
        self.wakeup = transport.Wakeup()  # where Join and Ready wait: a barrier costs no thread per party

    # --- helpers ---------------------------------------------------------------------------

    def _caller(self, party: str, context: grpc.ServicerContext) -> str:
        if party not in self.roles:
            raise transport.Refused(grpc.StatusCode.PERMISSION_DENIED,
                                    f"`{party}` is not a party of job {self.job.job_id}")
        if self.identity is not None:
            self.identity.check(context, party)
        return party

    def _fail(self, message: str) -> None:
        log.error("%s", message)
        self.state.set_phase("Failed", message)
        self.wakeup.notify()
        raise transport.Refused(grpc.StatusCode.FAILED_PRECONDITION, message)

    async def _wait_for(self, fetch: Callable[[], T | None], wait_s: float) -> T | None:
        """A long poll: `fetch()` once it has a value, None after `wait_s`; parked, not a thread, meanwhile."""
        def probe() -> T | None:
            if self.state.phase() == "Failed":
                raise transport.Refused(grpc.StatusCode.FAILED_PRECONDITION, f"job failed: {self.state.error()}")
            return fetch()

        return await self.wakeup.until(probe, min(max(wait_s, 0.0), _MAX_POLL_S), tick_s=_TICK_S)

    # --- RPCs ------------------------------------------------------------------------------

    @transport.refusals
    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> pb.JoinReply:
        party = self._caller(request.party, context)
        if request.role != self.roles[party]:
            raise transport.Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"`{party}` joined as {request.role or 'no role'} but the job lists it as {self.roles[party]}",
            )
        theirs = json.loads(request.terms_json or "{}")
        await transport.off_loop(self._joined, party, theirs)
        return pb.JoinReply(ready=True, job_id=self.job.job_id, terms_json=json.dumps(self.terms))

    def _joined(self, party: str, theirs: dict[str, Any]) -> None:
        if theirs != self.terms:  # the party refuses too, from the terms in the reply
            found = job_terms.differences(self.terms, theirs)
            message = f"{party}: its terms differ from the scheduler's job file: " + "; ".join(found)
            log.error("%s", message)
            self.state.set_phase("Failed", message)
            self.wakeup.notify()
            return
        self.state.update_party(party, state="joined")
        log.info("%s joined", party)

    @transport.refusals
    async def Ready(self, request: pb.ReadyRequest, context: grpc.aio.ServicerContext) -> pb.StartInfo:
        party = self._caller(request.party, context)
        entry = {
            "samples": request.samples,
            "max_steps": request.max_steps,
            "schema": json.loads(request.adapter_schema_json or "[]"),
            "public_key": base64.b64encode(request.public_key).decode(),
            "signature": base64.b64encode(request.public_key_signature).decode(),
            "certificate": base64.b64encode(request.certificate).decode(),
            "nonce": base64.b64encode(request.nonce).decode(),
            "terms_digest": request.terms_digest,
        }
        await transport.off_loop(self._ready, party, entry, request)
        start = await self._wait_for(lambda: self.state.get_json("start"), request.wait_s)
        if start is None:
            return pb.StartInfo(ready=False)
        return start_info(start, self.rounds)

    def _ready(self, party: str, entry: dict[str, Any], request: pb.ReadyRequest) -> None:
        with self.lock:
            ready: dict[str, Any] = self.state.get_json("ready") or {}
            self._check_schema(party, entry["schema"], ready)
            self._check_same_key(party, entry)
            ready[party] = entry
            self.state.set_json("ready", ready)
            self.state.update_party(party, state="ready", samples=request.samples, max_steps=request.max_steps)
            if set(ready) == set(self.roles) and self.state.get_json("start") is None:
                self._start(ready)

    @transport.refusals
    def Report(self, request: pb.StatusReport, context: grpc.ServicerContext) -> pb.JobPhase:
        party = self._caller(request.party, context)
        fields: dict[str, Any] = {"state": request.state, "round": request.round, "step": request.step}
        if request.max_steps:
            fields["max_steps"] = request.max_steps
        if request.state != "failed":  # a failure report carries no round
            metrics.ROUND.labels(party=party).set(request.round)
        if request.has_loss:
            fields["loss"] = request.loss
            metrics.TRAIN_LOSS.labels(party=party).set(request.loss)
            record = {"step": request.step, "loss": request.loss, "round": request.round, "t": time.time()}
            self.state.append_metric(party, record)
        if request.has_eval_loss:
            fields["eval_loss"] = request.eval_loss
            metrics.EVAL_LOSS.labels(party=party).set(request.eval_loss)
            self.state.put_eval(request.round, party, request.eval_loss, request.eval_samples)
            self.state.append_metric(party, {"event": "eval", "round": request.round, "eval_loss": request.eval_loss,
                                             "samples": request.eval_samples, "t": time.time()})
        if request.state == "aggregated":
            self.state.append_metric(
                party, {"event": "round", "round": request.round, "step": request.step,
                        "wait_s": request.round_wait_s, "t": time.time()}
            )
        if request.error:
            fields["error"] = request.error
        self.state.update_party(party, **fields)
        if request.state == "failed":
            self.state.set_phase("Failed", f"{party}: {request.error or 'failed'}")
            self.wakeup.notify()
        elif request.state == "succeeded":
            log.info("%s succeeded", party)
            self.maybe_succeed()
        return pb.JobPhase(phase=self.state.phase(), error=self.state.error())

    def GetStatus(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusJson:
        return pb.StatusJson(json=self.state.snapshot().to_json())

    # --- decisions -------------------------------------------------------------------------

    def _check_schema(self, party: str, schema: list, ready: dict[str, Any]) -> None:
        """Every party must train the very same adapter, or the average means nothing."""
        for other, entry in ready.items():
            if other == party or entry["schema"] == schema:
                continue
            difference = describe_schema_difference(party, schema, other, entry["schema"])
            self._fail(f"adapters do not match: {difference}")

    def _check_same_key(self, party: str, entry: dict) -> None:
        """After the start, peers' pairwise secrets depend on this key: a new one cannot be taken."""
        start = self.state.get_json("start")
        if not start or party not in start["keys"]:
            return
        kept = start["keys"][party]
        if kept["public_key"] != entry["public_key"] or kept["nonce"] != entry["nonce"]:
            self._fail(
                f"{party} rejoined with a different key-agreement key or session nonce; its masks could no longer "
                "cancel (keep its state folder across restarts)",
            )

    def _start(self, ready: dict[str, Any]) -> None:
        spec = self.job.spec
        chosen = strategy.of(spec.aggregation)
        weights = chosen.weights({name: e["samples"] for name, e in ready.items()})
        keys = {name: {k: e[k] for k in BUNDLE_FIELDS} for name, e in ready.items()}
        for warning in start_warnings(spec):
            log.warning("%s", warning)
            self.state.add_warning(warning)
        self.state.set_json("start", {"weights": weights, "keys": keys})
        self.state.set_phase("Running")
        self.wakeup.notify()
        log.info("all %d parties ready; training starts (%s: weights %s)", len(ready), chosen.describe(), weights)

    def maybe_succeed(self) -> None:
        """Succeeded once every party has, but for those its launcher gave up on (state `lost`: a secagg_plus
        label_trainer out of restarts, which the rounds went without) and those the rounds went on without
        to the last (`dropped`: frozen, or never answering), once every round is aggregated."""
        if self.state.phase() != "Running":
            return
        waiting = [name for name in self.roles if self.state.party(name).state not in FINISHED]
        if waiting and self.state.completed_round() == self.rounds:
            waiting = [name for name in waiting if not self._drop_if_gone(name)]
        if not waiting:
            self.state.set_phase("Succeeded")
            log.info("job %s succeeded", self.job.job_id)

    def _drop_if_gone(self, name: str) -> bool:
        """Mark `name` dropped if the last round went without it (from the first of the rounds it missed in a
        row up to the last); True when it was."""
        dropouts = self.state.dropouts()
        first = self.rounds
        if name not in dropouts.get(str(first), []):
            return False
        while name in dropouts.get(str(first - 1), []):
            first -= 1
        self.state.update_party(name, state=DROPPED, dropped_from=first)
        message = f"{name} was dropped from round {first} on (no sign of life); the job ended without it"
        log.warning("%s", message)
        self.state.add_warning(message)
        return True


BUNDLE_FIELDS = ("public_key", "signature", "certificate", "nonce", "terms_digest")


def start_info(start: dict[str, Any], rounds: int) -> pb.StartInfo:
    """The Ready answer: the weights and every party's signed key bundle, as each party sent it."""
    keys = start["keys"]

    def field(name: str) -> dict[str, bytes]:
        return {party: base64.b64decode(bundle[name]) for party, bundle in keys.items()}

    return pb.StartInfo(ready=True, rounds=rounds, weights=start["weights"], public_keys=field("public_key"),
                        public_key_signatures=field("signature"), certificates=field("certificate"),
                        nonces=field("nonce"), terms_digests={p: b["terms_digest"] for p, b in keys.items()})


def start_warnings(spec: JobSpec) -> list[str]:
    """What the job's security settings leave open, said once when it starts."""
    scheme, warnings = spec.encryption.scheme, []
    if scheme != "plain" and len(spec.label_trainers) == 1 and not spec.standalone:
        warnings.append(f"encryption.{scheme} with a single label_trainer: pairwise masks cannot hide its update "
                        "from the aggregator")
    if spec.privacy.dp is not None and scheme == "plain":
        warnings.append("privacy.dp without secure aggregation (encryption: plain): the aggregator sees each "
                        "party's update, so each adds all the noise itself and the global adapter carries n times "
                        "the noise it needs; use encryption.secagg_plus or otp")
    if scheme != "plain" and not spec.tls.enabled:
        warnings.append(f"encryption.{scheme} without TLS: key-agreement values are not authenticated "
                        "(tls.enabled is false)")
    return warnings


def describe_schema_difference(a: str, schema_a: list, b: str, schema_b: list) -> str:
    names_a = {name: tuple(shape) for name, shape in schema_a}
    names_b = {name: tuple(shape) for name, shape in schema_b}
    for name, shape in names_a.items():
        if name not in names_b:
            return f"{a} trains `{name}`, which {b} does not have"
        if names_b[name] != shape:
            return f"`{name}` is {list(shape)} at {a} but {list(names_b[name])} at {b}"
    missing = sorted(set(names_b) - set(names_a))
    return f"{b} trains `{missing[0]}`, which {a} does not have" if missing else f"{a} and {b} differ"


class SchedulerClient:
    """What a party calls; every call retries while the scheduler restarts."""

    def __init__(self, address: str, party: str, tls: transport.TlsMaterial | None, *, deadline_s: float) -> None:
        self.party = party
        self.deadline_s = deadline_s
        self.stub = pb_grpc.SchedulerStub(transport.make_channel(address, tls, server_name="scheduler"))

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        return transport.call_with_retry(fn, what=f"scheduler {what}", deadline_s=self.deadline_s)

    def join(self, role: str, terms: dict[str, Any]) -> dict[str, Any]:
        """Announce this party with its terms; the scheduler's terms, for the party to compare."""
        request = pb.JoinRequest(party=self.party, role=role, wait_s=_MAX_POLL_S, terms_json=json.dumps(terms))
        reply = self._call("join", lambda: self.stub.Join(request, timeout=_MAX_POLL_S + 10))
        return json.loads(reply.terms_json or "{}")

    def ready(self, request: pb.ReadyRequest) -> pb.StartInfo:
        request.party, request.wait_s = self.party, _MAX_POLL_S
        while True:
            reply = self._call("ready", lambda: self.stub.Ready(request, timeout=_MAX_POLL_S + 10))
            if reply.ready:
                return reply
            log.info("waiting for every party to be ready")

    def report(self, state: str, *, deadline_s: float | None = None, **fields: Any) -> pb.JobPhase:
        request = pb.StatusReport(party=self.party, state=state, **fields)
        return transport.call_with_retry(lambda: self.stub.Report(request, timeout=30), what="scheduler report",
                                         deadline_s=deadline_s or self.deadline_s)


def serve(job: FederatedFineTune, state: JobState, listen: str, tls: transport.TlsMaterial | None,
          *, linger_s: float = 5.0) -> int:
    """Run the scheduler until the job ends; 0 when it succeeded."""
    identity = transport.PeerIdentity.of(job.spec) if tls else None
    server, port = transport.make_server(listen, tls)
    service = SchedulerService(job, state, identity)
    pb_grpc.add_SchedulerServicer_to_server(service, server)
    state.init(len(job.spec.fractions()), {p.name: p.role for p in job.spec.parties})
    metrics.serve(SCHEDULER)
    for party in job.spec.parties:
        metrics.ROUNDS.labels(party=party.name).set(len(job.spec.fractions()))
    server.start()
    log.info("scheduler of job %s listening on port %d", job.job_id, port)
    try:
        checked = time.monotonic()
        while state.phase() not in ("Succeeded", "Failed"):
            if time.monotonic() - checked > 1.0:  # a party given up on sends no report to decide on
                service.maybe_succeed()
                checked = time.monotonic()
            time.sleep(0.05)
        if state.phase() == "Failed":  # parties still polling learn why from us rather than from a closed port
            time.sleep(linger_s)
        # On success every party has reported its end already: nobody is left to tell.
    finally:
        server.stop(grace=1).wait()
    if state.phase() == "Failed":
        log.error("job %s failed: %s", job.job_id, state.error())
        return 1
    return 0
