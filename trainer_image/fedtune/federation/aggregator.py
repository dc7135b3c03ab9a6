"""The aggregation service the assist_trainer runs: collect each round's protected updates, combine, serve.

Updates and global adapters are kept in Redis, so a restarted assist_trainer serves what
was aggregated before and keeps what was submitted. How updates are protected and
combined (plain sums or one-time pads) is the codec's business (`fedtune.secagg`).

Under `secagg_plus` (the protocol: `fedtune.secagg.plus`) a round may complete without some
label_trainers. It waits for every upload; a label_trainer that has not uploaded is dropped once
it has given no sign of life (an RPC, a progress report) for `dropout_timeout_s` since the round's
first upload, and every latecomer once `aggregation.round_timeout_s` has passed. The round's split
into uploaded and dropped is then fixed in Redis and later uploads for it are ignored. Each
uploader, as it polls `Fetch`, is first asked to confirm the split (it signs it); once every
uploader has (or `threshold` have and `dropout_timeout_s` has passed) the signers are fixed, and
each of them is asked to `Reveal` its shares, the signatures attached. With `threshold` answers
(within `round_timeout_s` of each step) the masks come off; the mean is over the survivors'
weights. A confirmation or reveal for a round already unmasked is not needed: it is accepted and
dropped. A dropped party that comes back fetches the round's result and carries on from the next round.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import numpy as np

from fedtune import privacy
from fedtune.federation import metrics, transport
from fedtune.federation.jobstate import JobState
from fedtune.federation.proto import fedtune_pb2 as pb
from fedtune.federation.proto import fedtune_pb2_grpc as pb_grpc
from fedtune.federation.strategy import FedAvg, Strategy
from fedtune.secagg import SecAggError, SecAggPlusCodec, SecAggPlusParty, UpdateCodec
from fedtune.spec import Dp
from fedtune.trust import certs

log = logging.getLogger(__name__)

# privacy.losses aggregate: weight·[a party's mean training loss of the round, 1], summed (masked) with the
# adapters and taken out of the global adapter by the aggregator.
LOSS_TENSOR = "fedtune.round_loss"
_MAX_POLL_S = 30.0
_POLL_S = 0.02  # how often the assist_trainer's own wait (a thread of its own, not a call) looks
_TICK_S = 0.5  # how often a waiting Fetch looks again unprompted: a job failed elsewhere, dropout deadlines
_DEADLINE_CHECK_S = 0.2  # how often waiting callers look at the round's deadlines (they read Redis)


class AggregatorService(pb_grpc.AggregatorServicer):
    def __init__(self, state: JobState, codec: UpdateCodec | SecAggPlusCodec, rounds: int, *,
                 round_timeout_s: float, dropout_timeout_s: float | None = None, dp: Dp | None = None,
                 honest: int = 1, identity: transport.PeerIdentity | None = None,
                 strategy: Strategy | None = None) -> None:
        self.state = state
        self.strategy = strategy or FedAvg()
        self.codec = codec
        self.plus = codec if isinstance(codec, SecAggPlusCodec) else None
        self.rounds = rounds
        self.round_timeout_s = round_timeout_s
        self.dropout_timeout_s = dropout_timeout_s if dropout_timeout_s is not None else round_timeout_s
        self.dp = dp
        self.honest = honest  # privacy.dp: the honest label_trainers whose noise each sum holds (for the report)
        self.identity = identity
        self.lock = threading.RLock()
        self.expected: set[str] | None = None  # the training parties; known once every party is ready
        self.own: str | None = None  # the assist_trainer itself, when it trains: its update is plaintext
        self.weights: dict[str, float] = {}
        self.publics: dict[str, bytes] = {}  # secagg_plus: each label_trainer's public bundle
        self.first_seen: dict[int, float] = {}  # round -> when its first upload (or split) was seen
        self.last_check: dict[int, float] = {}
        self.alive = _Liveness(state)
        self.wakeup = transport.Wakeup()  # where Fetch waits: a round's barrier costs no thread per party

    def configure(self, weights: dict[str, float], own: str | None, publics: dict[str, bytes] | None = None,
                  *, context: str | None = None) -> None:
        """`context`: the run's session id (`fedtune.federation.session`), which the parties' masks are bound to."""
        self.expected, self.own, self.weights = set(weights), own, dict(weights)
        self.publics = {party: key for party, key in (publics or {}).items() if key}
        if self.plus is not None:  # unmasking checks what the parties bound their masks to: this run
            self.plus = self.plus.bound_to((context or self.state.job_id).encode())
            self.codec = self.plus
        self._report_privacy()
        for round_ in range(self.state.completed_round() + 1, self.rounds + 1):
            self._maybe_aggregate(round_)  # a restart may find a round complete but not combined
        self.wakeup.notify()

    # --- the assist_trainer's own update and the rounds ------------------------------------

    def accept(self, round_: int, party: str, blob: bytes) -> None:
        if not 1 <= round_ <= self.rounds:
            raise SecAggError(f"{party} submitted round {round_}; this job has rounds 1..{self.rounds}")
        if self.state.get_global(round_) is not None:
            return  # a restarted party resubmitting a finished round: the global stands
        split = self.state.split(round_) if self.plus and party != self.own else None
        if split is not None:  # the round's uploads are fixed: a late one is never unmasked
            if party not in split["uploaded"]:
                log.info("round %d: ignored the late upload of %s, dropped from this round", round_, party)
            return
        self.state.put_update(round_, party, blob)
        self.first_seen.setdefault(round_, time.monotonic())
        self._maybe_aggregate(round_)

    def _maybe_aggregate(self, round_: int) -> None:
        with self.lock:
            if self.expected is None or self.state.get_global(round_) is not None:
                return
            submitted = self.state.submitted(round_)
            if self.own is not None and self.own not in submitted:
                return
            if self.plus is None:
                if self.expected <= submitted:
                    self._combine(round_, sorted(self.expected), [])
                return
            split = self.state.split(round_)
            if split is None and self.expected <= submitted:  # nobody dropped: only the self-masks come off
                split = self._set_split(round_, submitted)
            if (split is not None and self.state.signers(round_) is not None
                    and len(self.state.reveals(round_)) >= self.plus.threshold):
                self._combine(round_, split["uploaded"], split["dropped"])

    def _combine(self, round_: int, uploaded: list[str], dropped: list[str]) -> None:
        started = time.perf_counter()
        blobs = self.state.updates(round_)
        protected = {p: transport.unpack_tensors(blobs[p]) for p in uploaded if p != self.own}
        plaintext = {p: transport.unpack_tensors(blobs[p]) for p in [self.own] if p is not None}
        try:
            if self.plus is None:
                total = self.codec.combine(protected, plaintext)
            else:
                reveals = {p: dict(pb.RevealedShares.FromString(b).shares)
                           for p, b in self.state.reveals(round_).items()}
                total = self.plus.unmask(protected, plaintext, round_=round_, publics=self.publics,
                                         dropped=dropped, reveals=reveals)
        except SecAggError as err:
            self._fail(round_, str(err))
            return
        share = sum(self.weights[p] for p in [*protected, *plaintext]) if dropped else 1.0  # < 1: survivors only
        loss = total.pop(LOSS_TENSOR, None)  # privacy.losses aggregate: weight·[mean loss, 1], summed
        self._take_loss(round_, loss)
        self.state.put_global(round_, *self.strategy.finish(self.state, round_, total, share))
        self.wakeup.notify()
        metrics.mine(metrics.SECAGG_SECONDS, step="combine").observe(time.perf_counter() - started)
        self._report_privacy()
        without = f" without {', '.join(dropped)}" if dropped else ""
        log.info("round %d aggregated from %s%s in %.3f s", round_, ", ".join(sorted([*protected, *plaintext])),
                 without, time.perf_counter() - started)

    def _take_loss(self, round_: int, summed: np.ndarray | None) -> None:
        """privacy.losses aggregate: the parties' mean training loss of the round, all the host learns of it."""
        if summed is not None and summed[1] > 0:
            loss = float(summed[0] / summed[1])
            self.state.append_metric("aggregate_loss", {"round": round_, "loss": loss})
            log.info("round %d: the parties' mean training loss is %.4f", round_, loss)

    def _report_privacy(self) -> None:
        """ε so far, for the job status: every completed round is one Gaussian mechanism."""
        if self.dp is not None:
            dp = self.dp
            self.state.set_json("privacy", privacy.report(self.state.completed_round(), dp.noise_multiplier,
                                                          dp.clip_norm, dp.delta, self.honest))

    def _fail(self, round_: int, message: str) -> None:
        message = message if message.startswith(f"round {round_}:") else f"round {round_}: {message}"
        self.state.set_phase("Failed", message)
        self.wakeup.notify()
        log.error("%s", message)

    def wait_global(self, round_: int, wait_s: float, party: str | None = None) -> bytes | None:
        """The round's global adapter, or None after `wait_s`; raises JobAborted when the job failed."""
        blob, _ = self.wait_for(round_, wait_s, party)
        return blob

    def wait_for(self, round_: int, wait_s: float,
                 party: str | None = None) -> tuple[bytes | None, pb.UnmaskRequest | None]:
        """The round's global adapter; or, for a secagg_plus survivor, what it must reveal first; or
        (None, None) after `wait_s`. Raises JobAborted when the job failed. Blocks the calling thread:
        for the assist_trainer's own training loop; callers over gRPC wait in `Fetch`, without one."""
        deadline = time.monotonic() + wait_s
        while (found := self._look(round_, party)) is None and time.monotonic() < deadline:
            time.sleep(_POLL_S)
        return found or (None, None)

    def _look(self, round_: int, party: str | None) -> tuple[bytes | None, pb.UnmaskRequest | None] | None:
        """One look at the round for a waiting caller: its global adapter, or what `party` must reveal, or None."""
        blob = self.state.get_global(round_)
        if blob is not None and (round_ > 0 or self._shares_complete()):
            return blob, None
        if self.state.phase() == "Failed":
            raise transport.JobAborted(self.state.error())
        if party is not None:
            self.alive.saw(party)
            request = self._unmask_request(round_, party)
            if request is not None:
                return None, request
        self._check_deadlines(round_)
        return None

    def _check_deadlines(self, round_: int) -> None:
        now = time.monotonic()
        if round_ < 1 or now - self.last_check.get(round_, 0.0) < _DEADLINE_CHECK_S:
            return
        self.last_check[round_] = now
        if self.expected is None or self.state.get_global(round_) is not None:
            return
        if self.plus is None:
            self._check_timeout(round_)
            return
        with self.lock:
            split = self.state.split(round_)
            if split is None:
                self._maybe_drop(round_, now)
            else:
                self._maybe_fix_signers(round_, split, now)
                self._check_answers(round_, now)
        self._maybe_aggregate(round_)

    def _check_timeout(self, round_: int) -> None:
        """A party that never submits fails the round instead of blocking it forever."""
        first = self.first_seen.get(round_)
        if first is None or self.expected is None or time.monotonic() - first < self.round_timeout_s:
            return
        missing = sorted(self.expected - self.state.submitted(round_))
        if missing:
            self._fail(round_, f"no update from {', '.join(missing)} within "
                               f"aggregation.round_timeout_s={self.round_timeout_s:g} s")

    # --- secagg_plus ----------------------------------------------------------------------------

    def _label_trainers(self) -> set[str]:
        assert self.expected is not None
        return self.expected - {self.own}

    def _maybe_drop(self, round_: int, now: float) -> None:
        """Fix the round's split once every label_trainer that has not uploaded is gone (or too late)."""
        submitted = self.state.submitted(round_)
        if not submitted:
            return
        first = self.first_seen.setdefault(round_, now)  # after a restart: from when this one first saw them
        missing = sorted(self._label_trainers() - submitted)
        if not missing:
            return
        late = now - first >= self.round_timeout_s
        silent = all(now - max(first, self.alive.last(p)) >= self.dropout_timeout_s for p in missing)
        if not (late or silent):
            return
        reason = (f"aggregation.round_timeout_s={self.round_timeout_s:g} s" if late
                  else f"encryption.secagg_plus.dropout_timeout_s={self.dropout_timeout_s:g} s")
        log.warning("round %d: dropping %s (no upload and no sign of life within %s)", round_, ", ".join(missing),
                    reason)
        self._set_split(round_, submitted)

    def _set_split(self, round_: int, submitted: set[str]) -> dict[str, list[str]] | None:
        assert self.plus is not None
        uploaded = sorted(self._label_trainers() & submitted)
        dropped = sorted(self._label_trainers() - submitted)
        try:
            self.plus.check_split(round_, uploaded, dropped)
        except SecAggError as err:
            self._fail(round_, f"{err} (dropped: {', '.join(dropped)})")
            return None
        self.first_seen[round_] = time.monotonic()  # the reveal deadline counts from here
        split = self.state.set_split(round_, uploaded, dropped)
        self.wakeup.notify()  # the uploaders waiting in Fetch are asked to reveal
        return split

    def _maybe_fix_signers(self, round_: int, split: dict[str, list[str]], now: float) -> None:
        """Close the consistency check: every uploader signed the split, or `threshold` did and the others
        have had `dropout_timeout_s` to. The signatures go out with every reveal request."""
        assert self.plus is not None
        if self.state.signers(round_) is not None:
            return
        signed = self.state.signatures(round_)
        since = self.first_seen.setdefault(round_, now)
        if set(split["uploaded"]) <= set(signed) or (
                len(signed) >= self.plus.threshold and now - since >= self.dropout_timeout_s):
            self.state.fix_signers(round_, signed)
            self.first_seen[round_] = now  # the reveal deadline counts from here

    def _check_answers(self, round_: int, now: float) -> None:
        """Fail the round when `threshold` survivors have not confirmed the split, or revealed their shares,
        within the round's timeout of the step before.

        Waiting is cheap and failing ends the job, so an uploader that died is waited for: it
        comes back (a pod restarts), derives its keys again and answers.
        """
        assert self.plus is not None
        since = self.first_seen.setdefault(round_, now)
        confirming = self.state.signers(round_) is None
        answered = sorted(self.state.signatures(round_) if confirming else self.state.reveals(round_))
        if len(answered) >= self.plus.threshold or now - since < self.round_timeout_s:
            return
        what = "confirmed the survivor set" if confirming else "revealed their shares"
        self._fail(round_, f"only {len(answered)} survivors {what} ({', '.join(answered) or 'none'}) "
                           f"within aggregation.round_timeout_s={self.round_timeout_s:g} s; "
                           f"encryption.secagg_plus.threshold needs {self.plus.threshold}")

    def _unmask_request(self, round_: int, party: str) -> pb.UnmaskRequest | None:
        """What `party` must answer for `round_`, if it is an uploader: confirm the split (no signatures in
        the request), then, once the signers are fixed and it is one of them, reveal its shares."""
        if self.plus is None or round_ < 1:
            return None
        split = self.state.split(round_)
        if split is None or party not in split["uploaded"]:
            return None
        signers = self.state.signers(round_)
        if signers is None:
            if self.state.signed(round_, party):
                return None
            return pb.UnmaskRequest(round=round_, uploaded=split["uploaded"], dropped=split["dropped"])
        if party not in signers or self.state.revealed(round_, party):
            return None
        ciphertexts = {sender: self.plus.round_ciphertexts(shares[party], round_, sender)
                       for sender, shares in self._shares().items() if sender != party}
        return pb.UnmaskRequest(round=round_, uploaded=split["uploaded"], dropped=split["dropped"],
                                ciphertexts=ciphertexts, signatures=signers)

    def _shares(self) -> dict[str, dict[str, bytes]]:
        """Sender -> recipient -> the encrypted shares it handed in before round 1."""
        return {p: dict(pb.EncryptedShares.FromString(b).shares) for p, b in self.state.shares().items()}

    def _shares_complete(self) -> bool:
        """Under secagg_plus, no party may start before every label_trainer's shares are in: a party
        that dropped without them could never be unmasked."""
        if self.plus is None:
            return True
        return self.expected is not None and self._label_trainers() <= self.state.share_senders()

    def accept_shares(self, party: str, shares: dict[str, bytes]) -> None:
        assert self.plus is not None
        self.plus.check_share_upload(party, shares)
        self.state.put_shares(party, pb.EncryptedShares(party=party, shares=shares).SerializeToString())
        self.wakeup.notify()  # round 0 is served once every label_trainer's shares are in

    def accept_reveal(self, round_: int, party: str, shares: dict[str, bytes], signature: bytes = b"") -> None:
        """A survivor's confirmation (`signature`, no shares) or reveal. Either is not needed once the round
        is unmasked, and a confirmation once the signers are fixed: accepted, and dropped."""
        assert self.plus is not None
        with self.lock:  # not between a combine's check and its write: the answer is needed or it is not
            if self.state.get_global(round_) is not None:
                return
            split = self.state.split(round_)
            if split is None or party not in split["uploaded"]:
                raise SecAggError(f"round {round_}: `{party}` was not asked to confirm or reveal shares")
            if not shares:
                if self.state.signers(round_) is None:
                    self.state.put_signature(round_, party, signature)
                    self._maybe_fix_signers(round_, split, time.monotonic())
                return
            signers = self.state.signers(round_)
            if signers is None or party not in signers:
                raise SecAggError(f"round {round_}: `{party}` was not asked to reveal shares (it has not confirmed "
                                  "the survivor set)")
            missing = sorted(set(self.plus.holders) - set(shares))
            if missing or any(len(v) != 32 for v in shares.values()):
                raise SecAggError(f"round {round_}: `{party}` must reveal one 32-byte share per label_trainer "
                                  f"(missing: {', '.join(missing) or 'none'})")
            self.state.put_reveal(round_, party, pb.RevealedShares(party=party, round=round_, shares=shares)
                                  .SerializeToString())
        self._maybe_aggregate(round_)

    # --- RPCs ------------------------------------------------------------------------------

    def _training_caller(self, party: str, context: grpc.ServicerContext) -> None:
        """A training party other than the assist_trainer, while the job runs."""
        if self.identity is not None:
            self.identity.check(context, party)
        if self.expected is None:
            raise transport.Refused(grpc.StatusCode.UNAVAILABLE, "aggregator is starting; retry")
        if party not in self.expected or party == self.own:
            raise transport.Refused(grpc.StatusCode.PERMISSION_DENIED, f"`{party}` is not a training party of this job")
        if self.state.phase() == "Failed":
            raise transport.Refused(grpc.StatusCode.FAILED_PRECONDITION, f"job failed: {self.state.error()}")
        self.alive.saw(party)

    def _answer(self, accept: Callable[[], None]) -> pb.JobPhase:
        try:
            accept()
        except SecAggError as err:
            raise transport.Refused(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
        return pb.JobPhase(phase=self.state.phase(), error=self.state.error())

    def _secagg_plus(self) -> None:
        if self.plus is None:
            raise transport.Refused(grpc.StatusCode.FAILED_PRECONDITION, "this job does not use encryption.secagg_plus")

    @transport.refusals
    def Submit(self, request_iterator: Iterator[pb.Chunk], context: grpc.ServicerContext) -> pb.JobPhase:
        header, blob = transport.join_chunks(request_iterator)
        self._training_caller(header.party, context)
        metrics.mine(metrics.BYTES_RECEIVED).inc(len(blob))
        return self._answer(lambda: self.accept(header.round, header.party, blob))

    @transport.refusals
    def ShareKeys(self, request: pb.EncryptedShares, context: grpc.ServicerContext) -> pb.JobPhase:
        self._training_caller(request.party, context)
        self._secagg_plus()
        return self._answer(lambda: self.accept_shares(request.party, dict(request.shares)))

    @transport.refusals
    def Reveal(self, request: pb.RevealedShares, context: grpc.ServicerContext) -> pb.JobPhase:
        self._training_caller(request.party, context)
        self._secagg_plus()
        return self._answer(lambda: self.accept_reveal(request.round, request.party, dict(request.shares),
                                                       request.signature))

    @transport.refusals
    async def Fetch(self, request: pb.FetchRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Chunk]:
        """A long poll parked on the service's wakeup (no thread held), then the blob in chunks."""
        if self.identity is not None:
            self.identity.check(context, request.party)
        wait_s = min(max(request.wait_s, 0.0), _MAX_POLL_S)
        try:
            found = await self.wakeup.until(lambda: self._look(request.round, request.party), wait_s, tick_s=_TICK_S)
            phase = await transport.off_loop(self.state.phase)
        except transport.JobAborted as err:
            raise transport.Refused(grpc.StatusCode.FAILED_PRECONDITION, f"job failed: {err}") from None
        blob, unmask = found or (None, None)
        header = pb.BlobHeader(party=request.party, round=request.round, ready=blob is not None, phase=phase,
                               unmask=unmask)
        metrics.mine(metrics.BYTES_SENT).inc(len(blob or b""))
        for chunk in transport.blob_chunks(header, blob or b""):
            yield chunk


def start_server(service: AggregatorService, listen: str,
                 tls: transport.TlsMaterial | None = None) -> tuple[transport.Server, int]:
    server, port = transport.make_server(listen, tls)
    pb_grpc.add_AggregatorServicer_to_server(service, server)
    server.start()
    return server, port


class AggregatorClient:
    """A label_trainer's side: submit its protected update, fetch the global adapter."""

    def __init__(self, address: str, party: str, tls: transport.TlsMaterial | None, *, deadline_s: float,
                 server_name: str = "assist_trainer") -> None:
        self.party = party
        self.deadline_s = deadline_s
        # Under mTLS the server must present the assist_trainer's own certificate, whatever the address.
        self.stub = pb_grpc.AggregatorStub(transport.make_channel(address, tls, server_name=server_name))

    def submit(self, round_: int, blob: bytes) -> None:
        header = pb.BlobHeader(party=self.party, round=round_)
        transport.call_with_retry(
            lambda: self.stub.Submit(transport.blob_chunks(header, blob), timeout=300),
            what=f"submit round {round_}", deadline_s=self.deadline_s,
        )
        metrics.mine(metrics.BYTES_SENT).inc(len(blob))

    def share_keys(self, shares: dict[str, bytes]) -> None:
        request = pb.EncryptedShares(party=self.party, shares=shares)
        transport.call_with_retry(lambda: self.stub.ShareKeys(request, timeout=60), what="hand in the shares",
                                  deadline_s=self.deadline_s)

    def fetch(self, round_: int, answer: Callable[[pb.UnmaskRequest], pb.RevealedShares] | None = None) -> bytes:
        """The round's global adapter; under secagg_plus `answer` (a `PlusAnswers`) answers the aggregator's
        requests meanwhile."""
        request = pb.FetchRequest(party=self.party, round=round_, wait_s=_MAX_POLL_S)
        while True:
            header, blob = transport.call_with_retry(
                lambda: transport.join_chunks(self.stub.Fetch(request, timeout=_MAX_POLL_S + 60)),
                what=f"fetch round {round_}", deadline_s=self.deadline_s,
            )
            if header.ready:
                metrics.mine(metrics.BYTES_RECEIVED).inc(len(blob))
                return blob
            if header.HasField("unmask"):
                if answer is None:
                    raise SecAggError(f"round {round_}: the aggregator asked for shares this party does not hold")
                if header.unmask.round != round_:
                    raise SecAggError(f"round {header.unmask.round}: asked for shares while closing round {round_}; "
                                      "refusing")
                self._reveal(answer(header.unmask))

    def _reveal(self, answer: pb.RevealedShares) -> None:
        what = "confirm the survivor set" if answer.signature or not answer.shares else "reveal shares"
        transport.call_with_retry(lambda: self.stub.Reveal(answer, timeout=60),
                                  what=f"{what} for round {answer.round}", deadline_s=self.deadline_s)


class PlusAnswers:
    """A label_trainer's answers to the aggregator's secagg_plus requests: it signs the survivor set it is
    shown (with its identity key), then reveals once enough survivors signed the same one.

    `key_pem` and `certificates` (its own and each peer's, checked against the federation at the start) are None
    without TLS: there is no identity to sign with, and signers are only counted.
    """

    def __init__(self, plus: SecAggPlusParty, key_pem: bytes | None, certificates: dict[str, bytes] | None) -> None:
        self.plus = plus
        self.key_pem = key_pem
        self.certificates = certificates

    def __call__(self, request: pb.UnmaskRequest) -> pb.RevealedShares:
        round_, uploaded, dropped = request.round, list(request.uploaded), list(request.dropped)
        answer = pb.RevealedShares(party=self.plus.party, round=round_)
        if not request.signatures:
            log.info("%s: confirming the survivor set of round %d (dropped: %s)", self.plus.party, round_,
                     ", ".join(dropped) or "none")
            statement = self.plus.confirm(round_, uploaded, dropped)
            answer.signature = certs.sign_statement(self.key_pem, statement) if self.key_pem else b""
            return answer
        log.info("%s: revealing shares for round %d", self.plus.party, round_)
        verify = self._signed_by if self.certificates is not None else None
        answer.shares.update(self.plus.reveal(round_, uploaded, dropped, dict(request.ciphertexts),
                                              dict(request.signatures), verify))
        return answer

    def _signed_by(self, signer: str, statement: bytes, signature: bytes) -> bool:
        assert self.certificates is not None
        cert = self.certificates.get(signer)
        return cert is not None and certs.statement_signed(cert, statement, signature)


class _Liveness:
    """When each party last gave a sign of life: an RPC to the aggregator, or a new progress report in Redis.

    Times are this process's monotonic clock, so parties' clocks never matter.
    """

    def __init__(self, state: JobState) -> None:
        self.state = state
        self.seen: dict[str, float] = {}
        self.reports: dict[str, float] = {}  # the `updated` stamp of each party's last report, as last read

    def saw(self, party: str) -> None:
        self.seen[party] = time.monotonic()

    def last(self, party: str) -> float:
        stamp = self.state.party(party).updated
        if self.reports.get(party) != stamp:
            self.reports[party] = stamp
            self.saw(party)
        return self.seen.get(party, 0.0)
