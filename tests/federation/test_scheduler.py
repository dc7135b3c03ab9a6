"""The scheduler's decisions, through real gRPC and a real Redis."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator

import grpc
import pytest
import yaml

from fedtune.federation import transport
from fedtune.federation.jobstate import JobState
from fedtune.federation.proto import fedtune_pb2 as pb
from fedtune.federation.proto import fedtune_pb2_grpc as pb_grpc
from fedtune.federation.scheduler import SchedulerService
from fedtune.spec import parse_job
from support.jobs import EXAMPLE

SCHEMA = [["lora_A", [4, 16]], ["lora_B", [16, 4]]]


def serve(redis_server, document: dict) -> Iterator[tuple[pb_grpc.SchedulerStub, JobState]]:
    job = parse_job(document)
    state = JobState.connect(redis_server.address, redis_server.password, job.job_id)
    state.init(len(job.spec.fractions()), {p.name: p.role for p in job.spec.parties})
    server, port = transport.make_server("127.0.0.1:0")
    pb_grpc.add_SchedulerServicer_to_server(SchedulerService(job, state), server)
    server.start()
    try:
        yield pb_grpc.SchedulerStub(transport.make_channel(f"127.0.0.1:{port}")), state
    finally:
        server.stop(0)


@pytest.fixture
def document() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def ready(stub: pb_grpc.SchedulerStub, party: str, samples: int, schema=SCHEMA, wait_s: float = 0) -> pb.StartInfo:
    return stub.Ready(pb.ReadyRequest(party=party, samples=samples, max_steps=samples,
                                      adapter_schema_json=json.dumps(schema), public_key=b"k-" + party.encode(),
                                      wait_s=wait_s), timeout=10)


def test_start_weights_follow_sample_counts(redis_server, document) -> None:
    for stub, state in serve(redis_server, document):
        ready(stub, "assist_trainer", 10)
        ready(stub, "node-1", 30)
        start = ready(stub, "node-2", 60)
        assert start.ready and start.rounds == 5
        assert dict(start.weights) == pytest.approx({"assist_trainer": 0.1, "node-1": 0.3, "node-2": 0.6})
        assert state.phase() == "Running"


def test_uniform_weighting_is_the_plain_mean(redis_server, document) -> None:
    document["spec"]["aggregation"]["weighting"] = "uniform"
    for stub, _ in serve(redis_server, document):
        ready(stub, "assist_trainer", 10)
        ready(stub, "node-1", 30)
        start = ready(stub, "node-2", 60)
        assert list(start.weights.values()) == pytest.approx([1 / 3] * 3)


def test_mismatched_adapters_fail_the_job_naming_tensor_and_parties(redis_server, document) -> None:
    for stub, state in serve(redis_server, document):
        ready(stub, "node-1", 30)
        with pytest.raises(grpc.RpcError) as info:
            ready(stub, "node-2", 30, schema=[["lora_A", [8, 16]], ["lora_B", [16, 8]]])
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "adapters do not match: `lora_A` is [8, 16] at node-2 but [4, 16] at node-1" in info.value.details()
        assert state.phase() == "Failed" and "lora_A" in state.error()


def test_single_label_trainer_under_otp_is_loud(redis_server, document) -> None:
    two = copy.deepcopy(document)
    two["spec"]["parties"] = two["spec"]["parties"][:2]
    two["spec"]["encryption"] = {"otp": {"csprng": {"name": "chacha20"}}}
    for stub, state in serve(redis_server, two):
        ready(stub, "assist_trainer", 10)
        ready(stub, "node-1", 30)
        assert any("single label_trainer" in w for w in state.snapshot().warnings)


def test_differential_privacy_without_secure_aggregation_is_loud(document) -> None:
    from fedtune.federation.scheduler import start_warnings
    from fedtune.spec import parse_job

    noisy = copy.deepcopy(document)
    noisy["spec"]["privacy"] = {"dp": {"clip_norm": 1.0, "noise_multiplier": 1.0}}
    assert any("privacy.dp without secure aggregation" in w for w in start_warnings(parse_job(noisy).spec))
    noisy["spec"]["encryption"] = {"secagg_plus": {}}
    assert not any("privacy.dp" in w for w in start_warnings(parse_job(noisy).spec))


def test_joining_under_the_wrong_role_is_refused(redis_server, document) -> None:
    for stub, _ in serve(redis_server, document):
        with pytest.raises(grpc.RpcError) as info:
            stub.Join(pb.JoinRequest(party="node-1", role="assist_trainer", wait_s=0), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "lists it as label_trainer" in info.value.details()


def test_a_role_waits_for_redis_that_comes_up_after_it() -> None:
    """On Kubernetes a role's pod may start before Redis's, or before its Service name resolves: the role
    waits for Redis to answer (up to wait_s) rather than fail; a wrong password still fails at once."""
    import threading
    import time

    import redis

    from fedtune.local.launcher import RedisServer

    server = RedisServer()
    starter = threading.Timer(1.5, server.start)
    starter.start()
    try:
        began = time.monotonic()
        state = JobState.connect(server.address, server.password, "late", wait_s=60)
        assert time.monotonic() - began >= 1.0  # it did wait: Redis was not there at first
        assert state.phase() == "Pending"
        with pytest.raises(redis.AuthenticationError):
            JobState.connect(server.address, "wrong", "late", wait_s=60)
    finally:
        starter.join()
        server.stop()
    with pytest.raises(redis.ConnectionError, match=rf"Redis at {server.address} did not answer within 1 s"):
        JobState.connect(server.address, server.password, "late", wait_s=1)


def test_the_job_ends_without_a_party_dropped_up_to_the_last_round_and_says_from_when(redis_server,
                                                                                     document) -> None:
    """node-2 missed rounds 3 to 5 of 5 (frozen): once every round is aggregated and the others are done, the job
    succeeds, node-2 `dropped` from round 3. A party dropped from an earlier round only came back: it is waited for."""
    job = parse_job(document)
    state = JobState.connect(redis_server.address, redis_server.password, job.job_id)
    state.init(5, {p.name: p.role for p in job.spec.parties})
    service = SchedulerService(job, state)
    state.set_phase("Running")
    for round_, dropped in ((1, ["node-1"]), (3, ["node-2"]), (4, ["node-2"]), (5, ["node-2"])):
        state.set_split(round_, [], dropped)
    for name in ("assist_trainer", "node-1"):
        state.update_party(name, state="succeeded")
    state.update_party("node-2", state="aggregating", round=2)
    service.maybe_succeed()
    assert state.phase() == "Running"  # round 5 is not aggregated yet
    for round_ in range(1, 6):
        state.put_global(round_, b"global")
    state.update_party("node-1", state="training")  # dropped from round 1 only: back, so waited for
    service.maybe_succeed()
    assert state.phase() == "Running" and state.party("node-2").state == "dropped"
    state.update_party("node-1", state="succeeded")
    service.maybe_succeed()
    status = state.snapshot()
    assert status.phase == "Succeeded"
    assert (status.parties["node-2"].state, status.parties["node-2"].dropped_from) == ("dropped", 3)
    assert "node-2 was dropped from round 3 on (no sign of life); the job ended without it" in status.warnings
