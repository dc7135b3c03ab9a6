"""Barriers with more waiters than server threads: Ready on the scheduler, Fetch on the aggregator.

A server with 4 worker threads holds every label_trainer a job may have (64) waiting for Ready, and
100 parties waiting in Fetch (one asyncio client in this process makes all the calls, so every
thread counted here belongs to the server or to gRPC). With one blocked thread per waiting call the
5th waiter would get no thread until a poll timed out, and the submissions that end the
aggregator's round none at all.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time

import grpc
import numpy as np
import yaml

from fedtune.federation import transport
from fedtune.federation.aggregator import AggregatorService
from fedtune.federation.jobstate import JobState
from fedtune.federation.proto import fedtune_pb2 as pb
from fedtune.federation.proto import fedtune_pb2_grpc as pb_grpc
from fedtune.federation.scheduler import SchedulerService
from fedtune.secagg import make_codec
from fedtune.spec import MAX_LABEL_TRAINERS, Encryption, parse_job
from support.jobs import EXAMPLE

WORKERS = 4
WAITERS = 100  # at the aggregator; at the scheduler, as many as a job has label_trainers
WAIT_S = 25.0  # each long poll may wait this long: released in seconds only if nobody waits for a thread
PROMPT_S = 8.0  # generous on a loaded 2-core machine; far below WAIT_S
SCHEMA = json.dumps([["lora_A", [4, 16]], ["lora_B", [16, 4]]])


def labels(count: int) -> list[str]:
    return [f"node-{i}" for i in range(1, count + 1)]


def many_party_job(count: int) -> dict:
    document = yaml.safe_load(EXAMPLE.read_text())
    template = document["spec"]["parties"][1]
    document["spec"]["parties"][1:] = [dict(copy.deepcopy(template), name=name) for name in labels(count)]
    return document


def server_threads() -> int:
    return sum(t.name.startswith("grpc-worker") for t in threading.enumerate())


async def gather_watching(calls: list, peak: list[int]) -> list:
    """Run the calls together, noting the most threads alive meanwhile."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    while not all(t.done() for t in tasks):
        peak.append(threading.active_count())
        await asyncio.sleep(0.05)
    return [t.result() for t in tasks]


def test_ready_barrier_releases_more_waiters_than_threads(redis_server) -> None:
    job = parse_job(many_party_job(MAX_LABEL_TRAINERS))
    state = JobState.connect(redis_server.address, redis_server.password, job.job_id)
    state.init(len(job.spec.fractions()), {p.name: p.role for p in job.spec.parties})
    server, port = transport.make_server("127.0.0.1:0", workers=WORKERS)
    pb_grpc.add_SchedulerServicer_to_server(SchedulerService(job, state), server)
    server.start()
    before = threading.active_count()

    async def scenario() -> tuple[list[pb.StartInfo], float, list[int]]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SchedulerStub(channel)

            def ready(party: str):
                return stub.Ready(pb.ReadyRequest(party=party, samples=10, max_steps=5, adapter_schema_json=SCHEMA,
                                                  wait_s=WAIT_S), timeout=WAIT_S + 10)

            peak: list[int] = []
            waiting = [ready(p) for p in labels(MAX_LABEL_TRAINERS)]
            watched = asyncio.ensure_future(gather_watching(waiting, peak))
            await asyncio.sleep(2.0)  # every waiter is in: none may have its answer yet
            assert not watched.done()
            assert server_threads() <= WORKERS
            released = time.monotonic()
            last = await ready("assist_trainer")  # the last party: the barrier opens
            replies = await watched
            return [last, *replies], time.monotonic() - released, peak

    try:
        replies, elapsed, peak = asyncio.run(scenario())
    finally:
        server.stop(0).wait()
    assert all(r.ready for r in replies) and len(replies) == MAX_LABEL_TRAINERS + 1
    assert elapsed < PROMPT_S, f"{MAX_LABEL_TRAINERS} waiters took {elapsed:.1f} s to be released"
    assert max(peak) - before <= WORKERS + 4, f"threads grew from {before} to {max(peak)} while they waited"


def test_fetch_barrier_serves_submissions_while_many_wait(redis_server) -> None:
    """100 label_trainers wait in Fetch for round 1 while the same 4 threads take their submissions."""
    codec = make_codec(Encryption.model_validate({"plain": {}}))
    parties = labels(WAITERS)
    state = JobState.connect(redis_server.address, redis_server.password, "barrier-test")
    service = AggregatorService(state, codec, rounds=1, round_timeout_s=120)
    server, port = transport.make_server("127.0.0.1:0", workers=WORKERS)
    pb_grpc.add_AggregatorServicer_to_server(service, server)
    server.start()
    service.configure({p: 1.0 / WAITERS for p in parties}, own=None)
    update = {p: np.full((4, 16), i, np.float32) for i, p in enumerate(parties)}
    before = threading.active_count()

    async def scenario() -> tuple[list[bytes], list[int]]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.AggregatorStub(channel)

            async def fetch(party: str) -> bytes:
                call = stub.Fetch(pb.FetchRequest(party=party, round=1, wait_s=WAIT_S), timeout=WAIT_S + 10)
                header, blob = transport.join_chunks([chunk async for chunk in call])
                assert header.ready, f"{party} was not served round 1 within one poll"
                return blob

            async def submit(party: str) -> None:
                blob = transport.pack_tensors(codec.encode_plain({"w": update[party] / WAITERS}))
                await stub.Submit(transport.blob_chunks(pb.BlobHeader(party=party, round=1), blob), timeout=30)

            peak: list[int] = []
            watched = asyncio.ensure_future(gather_watching([fetch(p) for p in parties], peak))
            await asyncio.sleep(2.0)
            assert not watched.done() and server_threads() <= WORKERS
            started = time.monotonic()
            await asyncio.gather(*(submit(p) for p in parties))
            blobs = await watched
            assert time.monotonic() - started < PROMPT_S
            return blobs, peak

    try:
        blobs, peak = asyncio.run(scenario())
    finally:
        server.stop(0).wait()
    expected = np.mean([update[p] for p in parties], axis=0)
    for blob in blobs:  # the mean of every party's update, served to each
        np.testing.assert_allclose(transport.unpack_tensors(blob)["w"], expected, rtol=1e-5)
    assert max(peak) - before <= WORKERS + 4
