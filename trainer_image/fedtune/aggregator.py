"""The aggregation service the assist_trainer runs: collect each round's protected updates, combine, serve.

Updates and global adapters are kept in Redis, so a restarted assist_trainer serves what
was aggregated before and keeps what was submitted. How updates are protected and
combined (plain sums or one-time pads) is the codec's business (`fedtune.secagg`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import grpc

from fedtune import transport
from fedtune.jobstate import JobState
from fedtune.proto import fedtune_pb2 as pb
from fedtune.proto import fedtune_pb2_grpc as pb_grpc
from fedtune.secagg import SecAggError, UpdateCodec

log = logging.getLogger(__name__)

_MAX_POLL_S = 30.0
_POLL_S = 0.02


class AggregatorService(pb_grpc.AggregatorServicer):
    def __init__(self, state: JobState, codec: UpdateCodec, rounds: int, *, round_timeout_s: float,
                 identity: transport.PeerIdentity | None = None) -> None:
        self.state = state
        self.codec = codec
        self.rounds = rounds
        self.round_timeout_s = round_timeout_s
        self.identity = identity
        self.lock = threading.Lock()
        self.expected: set[str] | None = None  # the training parties; known once every party is ready
        self.own: str | None = None  # the assist_trainer itself, when it trains: its update is plaintext
        self.first_seen: dict[int, float] = {}

    def configure(self, training_parties: set[str], own: str | None) -> None:
        self.expected, self.own = set(training_parties), own
        for round_ in range(self.state.completed_round() + 1, self.rounds + 1):
            self._maybe_aggregate(round_)  # a restart may find a round complete but not combined

    # --- the assist_trainer's own update and the rounds ------------------------------------

    def accept(self, round_: int, party: str, blob: bytes) -> None:
        if not 1 <= round_ <= self.rounds:
            raise SecAggError(f"{party} submitted round {round_}; this job has rounds 1..{self.rounds}")
        if self.state.get_global(round_) is not None:
            return  # a restarted party resubmitting a finished round: the global stands
        self.state.put_update(round_, party, blob)
        self.first_seen.setdefault(round_, time.monotonic())
        self._maybe_aggregate(round_)

    def _maybe_aggregate(self, round_: int) -> None:
        with self.lock:
            if self.expected is None or self.state.get_global(round_) is not None:
                return
            blobs = self.state.updates(round_)
            if not self.expected <= set(blobs):
                return
            started = time.perf_counter()
            updates = {p: transport.unpack_tensors(blobs[p]) for p in sorted(self.expected)}
            plaintext = {p: t for p, t in updates.items() if p == self.own}
            protected = {p: t for p, t in updates.items() if p != self.own}
            try:
                total = self.codec.combine(protected, plaintext)
            except SecAggError as err:
                self.state.set_phase("Failed", f"round {round_}: {err}")
                log.error("round %d: %s", round_, err)
                return
            self.state.put_global(round_, transport.pack_tensors(total))
            log.info("round %d aggregated from %s in %.2f s", round_, ", ".join(sorted(self.expected)),
                     time.perf_counter() - started)

    def wait_global(self, round_: int, wait_s: float) -> bytes | None:
        """The round's global adapter, or None after `wait_s`; raises JobAborted when the job failed."""
        deadline = time.monotonic() + wait_s
        while True:
            blob = self.state.get_global(round_)
            if blob is not None:
                return blob
            if self.state.phase() == "Failed":
                raise transport.JobAborted(self.state.error())
            self._check_timeout(round_)
            if time.monotonic() >= deadline:
                return None
            time.sleep(_POLL_S)

    def _check_timeout(self, round_: int) -> None:
        """A party that never submits fails the round instead of blocking it forever."""
        first = self.first_seen.get(round_)
        if first is None or self.expected is None or time.monotonic() - first < self.round_timeout_s:
            return
        missing = sorted(self.expected - self.state.submitted(round_))
        if missing:
            self.state.set_phase(
                "Failed",
                f"round {round_}: no update from {', '.join(missing)} within "
                f"aggregation.round_timeout_s={self.round_timeout_s:g} s",
            )

    # --- RPCs ------------------------------------------------------------------------------

    def Submit(self, request_iterator: Iterator[pb.Chunk], context: grpc.ServicerContext) -> pb.JobPhase:
        header, blob = transport.join_chunks(request_iterator)
        if self.identity is not None:
            self.identity.check(context, header.party)
        if self.expected is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "aggregator is starting; retry")
        if header.party not in self.expected or header.party == self.own:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"`{header.party}` is not a training party of this job")
        if self.state.phase() == "Failed":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"job failed: {self.state.error()}")
        try:
            self.accept(header.round, header.party, blob)
        except SecAggError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        return pb.JobPhase(phase=self.state.phase(), error=self.state.error())

    def Fetch(self, request: pb.FetchRequest, context: grpc.ServicerContext) -> Iterator[pb.Chunk]:
        if self.identity is not None:
            self.identity.check(context, request.party)
        try:
            blob = self.wait_global(request.round, min(max(request.wait_s, 0.0), _MAX_POLL_S))
        except transport.JobAborted as err:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"job failed: {err}")
        header = pb.BlobHeader(party=request.party, round=request.round, ready=blob is not None,
                               phase=self.state.phase())
        yield from transport.blob_chunks(header, blob or b"")


def start_server(service: AggregatorService, listen: str,
                 tls: transport.TlsMaterial | None = None) -> tuple[grpc.Server, int]:
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

    def fetch(self, round_: int) -> bytes:
        request = pb.FetchRequest(party=self.party, round=round_, wait_s=_MAX_POLL_S)
        while True:
            header, blob = transport.call_with_retry(
                lambda: transport.join_chunks(self.stub.Fetch(request, timeout=_MAX_POLL_S + 60)),
                what=f"fetch round {round_}", deadline_s=self.deadline_s,
            )
            if header.ready:
                return blob
