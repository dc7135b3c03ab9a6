"""gRPC plumbing shared by every role: servers, channels, retries and chunked blobs.

Adapters travel as safetensors blobs streamed in 1 MiB chunks, so no single message
approaches gRPC's size limits whatever the adapter's size.

Servers are gRPC's asyncio servers on an event loop thread of their own: a call that waits (a
barrier, a long poll) is a coroutine parked on a `Wakeup`, not a blocked thread, so a hundred
parties waiting at a barrier cost a hundred coroutines. Plain calls, and the Redis reads a
waiting call makes, run on one bounded thread pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from fedtune.federation.proto import fedtune_pb2 as pb
from fedtune.trust import certs

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
_OPTIONS = [
    ("grpc.max_send_message_length", 8 << 20),
    ("grpc.max_receive_message_length", 8 << 20),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_permit_without_calls", 1),
]
# Codes that mean "the other side is not there (yet)": a restarting role; worth retrying.
_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}

T = TypeVar("T")
Tensors = dict[str, np.ndarray]


class TransportError(RuntimeError):
    """A peer could not be reached in time, or refused the call; the message says which and why."""


class JobAborted(RuntimeError):
    """The job failed elsewhere; this role stops with the job's error."""


@dataclass(frozen=True)
class TlsMaterial:
    """PEM bytes of the federation's CA and this role's certificate and key."""

    ca: bytes
    cert: bytes
    key: bytes


class Refused(Exception):
    """A call refused with a status code; `refusals` turns it into the caller's error (sync or async handler)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


H = TypeVar("H", bound=Callable[..., Any])


def refusals(handler: H) -> H:
    """Abort the call with a `Refused` raised anywhere below the handler (plain, coroutine or async stream).

    Helpers raise rather than call `context.abort`, which an asyncio handler must await."""
    if inspect.isasyncgenfunction(handler):
        @functools.wraps(handler)
        async def stream(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async for item in handler(self, request, context):
                    yield item
            except Refused as refused:
                await context.abort(refused.code, refused.details)
        return stream  # type: ignore[return-value]
    if inspect.iscoroutinefunction(handler):
        @functools.wraps(handler)
        async def unary(self: Any, request: Any, context: Any) -> Any:
            try:
                return await handler(self, request, context)
            except Refused as refused:
                await context.abort(refused.code, refused.details)
        return unary  # type: ignore[return-value]

    @functools.wraps(handler)
    def plain(self: Any, request: Any, context: Any) -> Any:
        try:
            return handler(self, request, context)
        except Refused as refused:
            context.abort(refused.code, refused.details)
    return plain  # type: ignore[return-value]


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking work (Redis, combining) on the server's bounded pool, never on its event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


class Wakeup:
    """Where a server's waiting calls park until the service changes something.

    `notify` may be called from any thread. Changes made by other processes (a job failed by the
    scheduler, a deadline passing) are seen at the next `tick_s`, when every waiter looks again."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    def notify(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
                loop.call_soon_threadsafe(self._fire)

    def _fire(self) -> None:
        assert self._event is not None
        self._event.set()
        self._event = asyncio.Event()

    async def until(self, probe: Callable[[], T | None], wait_s: float, *, tick_s: float) -> T | None:
        """`probe()` (run off the loop) once it is not None, or None after `wait_s`; its errors propagate."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._event = loop, asyncio.Event()
        deadline = loop.time() + max(wait_s, 0.0)
        while True:
            event = self._event  # taken before probing, so a change during the probe is not missed
            assert event is not None
            value = await off_loop(probe)
            remaining = deadline - loop.time()
            if value is not None or remaining <= 0:
                return value
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), min(tick_s, remaining))


class Server:
    """A gRPC asyncio server on an event loop thread of its own, with the interface of `grpc.Server`
    that the roles use (add handlers, start, stop), so synchronous code starts and stops it."""

    def __init__(self, workers: int) -> None:
        self.pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc-worker")
        self.loop = asyncio.new_event_loop()
        self.loop.set_default_executor(self.pool)  # `off_loop` work shares the bound
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-loop", daemon=True)
        self.thread.start()
        self.aio: grpc.aio.Server = self._run(self._create())

    async def _create(self) -> grpc.aio.Server:
        return grpc.aio.server(migration_thread_pool=self.pool, options=_OPTIONS)

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.aio.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        self.aio.add_registered_method_handlers(service, handlers)

    def listen(self, bind: str, tls: TlsMaterial | None) -> int:
        if tls is None:
            return self.aio.add_insecure_port(bind)
        creds = grpc.ssl_server_credentials([(tls.key, tls.cert)], root_certificates=tls.ca, require_client_auth=True)
        return self.aio.add_secure_port(bind, creds)

    def start(self) -> None:
        self._run(self.aio.start())

    def stop(self, grace: float | None) -> threading.Event:
        """Stop serving (calls in flight get `grace` seconds), then the loop and the pool; the event is set
        once all are gone."""
        done = threading.Event()
        if self.loop.is_closed():
            done.set()
            return done

        def finish() -> None:
            with contextlib.suppress(Exception):  # a server never started has nothing to stop
                self._run(self.aio.stop(grace))
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()
            self.loop.close()
            self.pool.shutdown(wait=False, cancel_futures=True)
            done.set()

        threading.Thread(target=finish, name="grpc-stop", daemon=True).start()
        return done


def make_server(bind: str, tls: TlsMaterial | None = None, *, workers: int = 16) -> tuple[Server, int]:
    """A server listening on `bind`: at most `workers` threads whatever the number of waiting callers."""
    server = Server(workers)
    try:
        port = server.listen(bind, tls)
    except RuntimeError:  # gRPC's "failed to bind"
        port = 0
    if port == 0:
        server.stop(0).wait()
        raise TransportError(f"cannot listen on {bind}: address in use or not local")
    return server, port


def make_channel(address: str, tls: TlsMaterial | None = None, *, server_name: str | None = None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(address, options=_OPTIONS)
    creds = grpc.ssl_channel_credentials(root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert)
    options = list(_OPTIONS)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(address, creds, options=options)


def call_with_retry(fn: Callable[[], T], *, what: str, deadline_s: float) -> T:
    """Retry transient failures (a peer restarting) with backoff until `deadline_s` runs out."""
    deadline = time.monotonic() + deadline_s
    delay = 0.2
    while True:
        try:
            return fn()
        except grpc.RpcError as err:
            code = err.code()
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                raise JobAborted(err.details()) from None
            if code not in _TRANSIENT:
                raise TransportError(f"{what}: {code.name}: {err.details()}") from None
            if time.monotonic() + delay > deadline:
                unavailable = code == grpc.StatusCode.UNAVAILABLE
                hint = " (is the peer up, and does it accept this party's certificate?)" if unavailable else ""
                raise TransportError(f"{what}: gave up after {deadline_s:.0f} s: {err.details()}{hint}") from None
            log.debug("%s: %s, retrying in %.1f s", what, code.name, delay)
        time.sleep(delay)
        delay = min(delay * 1.5, 3.0)


def blob_chunks(header: pb.BlobHeader, data: bytes) -> Iterator[pb.Chunk]:
    header.size = len(data)
    yield pb.Chunk(header=header)
    view = memoryview(data)
    for start in range(0, len(data), CHUNK_BYTES):
        yield pb.Chunk(data=bytes(view[start : start + CHUNK_BYTES]))


def join_chunks(chunks: Iterable[pb.Chunk]) -> tuple[pb.BlobHeader, bytes]:
    header: pb.BlobHeader | None = None
    parts: list[bytes] = []
    for chunk in chunks:
        if chunk.HasField("header"):
            header = chunk.header
        else:
            parts.append(chunk.data)
    if header is None:
        raise TransportError("blob stream without a header")
    data = b"".join(parts)
    if len(data) != header.size:
        raise TransportError(f"blob from {header.party or 'peer'} truncated: {len(data)} of {header.size} bytes")
    return header, data


def pack_tensors(tensors: Tensors) -> bytes:
    return _st_save({k: np.ascontiguousarray(v) for k, v in tensors.items()})


def unpack_tensors(blob: bytes) -> Tensors:
    # safetensors sorts keys on save; callers that care about order use their own key list.
    return dict(_st_load(blob))


def peer_names(context: grpc.ServicerContext) -> set[str]:
    """The names (common name and DNS SANs) on the caller's verified client certificate."""
    auth = context.auth_context()
    names = auth.get("x509_common_name", []) + auth.get("x509_subject_alternative_name", [])
    return {n.decode() for n in names}


class PeerIdentity:
    """Under mTLS, a caller speaks only for the party its certificate names; where the job file pins that
    party's identity, only with the pinned key (whichever CA of the bundle signed it); never with a
    revoked key."""

    def __init__(self, parties: Iterable[str], *, pins: Mapping[str, str | None] | None = None,
                 revoked: Iterable[str] = ()) -> None:
        self.parties = set(parties)
        self.pins = {name: pin for name, pin in (pins or {}).items() if pin}
        self.revoked = set(revoked)

    @classmethod
    def of(cls, spec: Any) -> PeerIdentity:
        """The identities a job spec (`fedtune.spec.JobSpec`) admits."""
        return cls((p.name for p in spec.parties), pins={p.name: p.identity for p in spec.parties},
                   revoked=spec.tls.revoked)

    def check(self, context: grpc.ServicerContext, party: str) -> None:
        names = peer_names(context)
        if party not in names:
            shown = ", ".join(sorted(names & self.parties)) or "no party of this job"
            self._refuse(context, f"the caller's certificate names {shown}; it may not act for `{party}`")
        if party not in self.pins and not self.revoked:
            return
        identity = peer_identity(context)
        if identity in self.revoked:
            self._refuse(context, f"the caller's key {identity} is revoked (spec.tls.revoked)")
        pin = self.pins.get(party)
        if pin is not None and identity != pin:
            self._refuse(context, f"the caller's key {identity} is not the one the job file pins for `{party}`")

    @staticmethod
    def _refuse(context: grpc.ServicerContext, message: str) -> None:
        log.warning("refused a call from %s: %s", context.peer(), message)
        raise Refused(grpc.StatusCode.PERMISSION_DENIED, message)


def peer_identity(context: grpc.ServicerContext) -> str | None:
    """The identity (`sha256:` of the public key) of the caller's verified client certificate."""
    pem = context.auth_context().get("x509_pem_cert", [])
    return certs.fingerprint(pem[0]) if pem else None
