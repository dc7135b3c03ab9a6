"""gRPC plumbing shared by every role: servers, channels, retries and chunked blobs.

Adapters travel as safetensors blobs streamed in 1 MiB chunks, so no single message
approaches gRPC's size limits whatever the adapter's size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import TypeVar

import grpc
import numpy as np
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from fedtune.federation.proto import fedtune_pb2 as pb

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


def make_server(bind: str, tls: TlsMaterial | None = None, *, workers: int = 16) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=_OPTIONS)
    try:
        if tls is None:
            port = server.add_insecure_port(bind)
        else:
            creds = grpc.ssl_server_credentials([(tls.key, tls.cert)], root_certificates=tls.ca,
                                                require_client_auth=True)
            port = server.add_secure_port(bind, creds)
    except RuntimeError:  # grpcio >= 1.60 raises where older ones returned 0
        port = 0
    if port == 0:
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
    """Under mTLS, a caller speaks only for the party its certificate names."""

    def __init__(self, parties: Iterable[str]) -> None:
        self.parties = set(parties)

    def check(self, context: grpc.ServicerContext, party: str) -> None:
        names = peer_names(context)
        if party not in names:
            shown = ", ".join(sorted(names & self.parties)) or "no party of this job"
            message = f"the caller's certificate names {shown}; it may not act for `{party}`"
            log.warning("refused a call from %s: %s", context.peer(), message)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, message)
