"""No one joins who does not belong: mutual TLS on every call, each caller acting only for itself."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from fedtune.federation import transport
from fedtune.federation.aggregator import AggregatorService, start_server
from fedtune.federation.jobstate import JobState
from fedtune.federation.proto import fedtune_pb2 as pb
from fedtune.federation.proto import fedtune_pb2_grpc as pb_grpc
from fedtune.federation.scheduler import SchedulerService
from fedtune.secagg import make_codec
from fedtune.spec import load_job
from fedtune.trust import certs
from support.jobs import EXAMPLE


@pytest.fixture(scope="module")
def federation() -> dict[str, certs.Issued]:
    ca = certs.make_ca("test")
    issued = {name: certs.issue(ca, name, dns_names=["localhost"], ips=["127.0.0.1"])
              for name in ("scheduler", "assist_trainer", "node-1", "node-2", "node-9")}
    return {"ca": ca, **issued}


def material(federation: dict, name: str) -> transport.TlsMaterial:
    return transport.TlsMaterial(ca=federation["ca"].cert_pem, cert=federation[name].cert_pem,
                                 key=federation[name].key_pem)


@pytest.fixture
def servers(redis_server, federation) -> Iterator[dict[str, int]]:
    """The job's scheduler and aggregator behind mTLS, in this process."""
    job = load_job(EXAMPLE)
    state = JobState.connect(redis_server.address, redis_server.password, job.job_id)
    state.init(len(job.spec.fractions()), {p.name: p.role for p in job.spec.parties})
    identity = transport.PeerIdentity(p.name for p in job.spec.parties)
    scheduler, scheduler_port = transport.make_server("127.0.0.1:0", material(federation, "scheduler"))
    pb_grpc.add_SchedulerServicer_to_server(SchedulerService(job, state, identity), scheduler)
    aggregator = AggregatorService(state, make_codec(job.spec.encryption), 5, round_timeout_s=30, identity=identity)
    aggregator.configure(dict.fromkeys(("assist_trainer", "node-1", "node-2"), 1 / 3), "assist_trainer")
    agg_server, agg_port = start_server(aggregator, "127.0.0.1:0", material(federation, "assist_trainer"))
    scheduler.start()
    yield {"scheduler": scheduler_port, "aggregator": agg_port}
    scheduler.stop(0)
    agg_server.stop(0)


def scheduler_stub(port: int, tls: transport.TlsMaterial | None, *, insecure: bool = False) -> pb_grpc.SchedulerStub:
    if insecure:
        return pb_grpc.SchedulerStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    return pb_grpc.SchedulerStub(transport.make_channel(f"127.0.0.1:{port}", tls, server_name="scheduler"))


def join(stub: pb_grpc.SchedulerStub, party: str) -> pb.JoinReply:
    return stub.Join(pb.JoinRequest(party=party, role="label_trainer", wait_s=0), timeout=5)


def test_member_with_own_certificate_is_served(servers, federation) -> None:
    reply = join(scheduler_stub(servers["scheduler"], material(federation, "node-1")), "node-1")
    assert reply.job_id == "poems-lora"


def test_client_without_certificate_is_refused(servers, federation) -> None:
    ca_only = grpc.ssl_channel_credentials(root_certificates=federation["ca"].cert_pem)
    channel = grpc.secure_channel(f"127.0.0.1:{servers['scheduler']}", ca_only,
                                  options=[("grpc.ssl_target_name_override", "scheduler")])
    with pytest.raises(grpc.RpcError) as info:
        join(pb_grpc.SchedulerStub(channel), "node-1")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError) as info:
        join(scheduler_stub(servers["scheduler"], None, insecure=True), "node-1")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_certificate_from_another_ca_is_refused(servers, federation) -> None:
    other_ca = certs.make_ca("intruders")
    forged = certs.issue(other_ca, "node-1")
    tls = transport.TlsMaterial(ca=federation["ca"].cert_pem, cert=forged.cert_pem, key=forged.key_pem)
    with pytest.raises(grpc.RpcError) as info:
        join(scheduler_stub(servers["scheduler"], tls), "node-1")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_valid_certificate_for_a_stranger_is_refused(servers, federation) -> None:
    with pytest.raises(grpc.RpcError) as info:
        join(scheduler_stub(servers["scheduler"], material(federation, "node-9")), "node-9")
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "`node-9` is not a party of job poems-lora" in info.value.details()


def test_node1_cannot_register_submit_or_fetch_as_node2(servers, federation) -> None:
    node1 = material(federation, "node-1")
    stub = scheduler_stub(servers["scheduler"], node1)
    for call in (lambda: join(stub, "node-2"),
                 lambda: stub.Ready(pb.ReadyRequest(party="node-2", samples=1, wait_s=0), timeout=5),
                 lambda: stub.Report(pb.StatusReport(party="node-2", state="failed", error="x"), timeout=5)):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "names node-1; it may not act for `node-2`" in info.value.details()
    aggregator = pb_grpc.AggregatorStub(
        transport.make_channel(f"127.0.0.1:{servers['aggregator']}", node1, server_name="assist_trainer"))
    header = pb.BlobHeader(party="node-2", round=1)
    with pytest.raises(grpc.RpcError) as info:
        aggregator.Submit(transport.blob_chunks(header, transport.pack_tensors({})), timeout=5)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as info:
        list(aggregator.Fetch(pb.FetchRequest(party="node-2", round=0, wait_s=0), timeout=5))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_refusals_leave_the_job_unaffected(servers, federation, redis_server) -> None:
    test_node1_cannot_register_submit_or_fetch_as_node2(servers, federation)
    state = JobState.connect(redis_server.address, redis_server.password, "poems-lora")
    assert state.phase() == "Pending" and state.party("node-2").state == "pending"
    replies: list[pb.JoinReply] = []
    thread = threading.Thread(target=lambda: replies.append(
        join(scheduler_stub(servers["scheduler"], material(federation, "node-2")), "node-2")))
    thread.start()
    thread.join()
    assert replies and replies[0].job_id == "poems-lora"


def test_server_must_be_who_the_client_expects(servers, federation) -> None:
    """A party dialling the scheduler refuses a server presenting another party's certificate."""
    channel = transport.make_channel(f"127.0.0.1:{servers['aggregator']}", material(federation, "node-1"),
                                     server_name="scheduler")
    with pytest.raises(grpc.RpcError) as info:
        join(pb_grpc.SchedulerStub(channel), "node-1")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_redis_refuses_every_command_without_password(redis_server) -> None:
    host, port = redis_server.address.split(":")
    no_retry = Retry(NoBackoff(), 0)  # an authentication error is final; don't wait on retries
    anonymous = redis.Redis(host=host, port=int(port), retry=no_retry)
    for command in (("PING",), ("GET", "k"), ("SET", "k", "v"), ("KEYS", "*"), ("CONFIG", "GET", "*"),
                    ("FLUSHALL",), ("INFO",)):
        with pytest.raises(redis.AuthenticationError):
            anonymous.execute_command(*command)
    wrong = redis.Redis(host=host, port=int(port), password="not-the-password", retry=no_retry)
    with pytest.raises(redis.AuthenticationError):
        wrong.ping()
    assert redis.Redis(host=host, port=int(port), password=redis_server.password).ping()


def test_a_members_report_sets_its_own_series_at_the_scheduler(servers, federation) -> None:
    """What node-1 reports (its train and valset losses) is what the scheduler's /metrics says of node-1."""
    from fedtune.federation import metrics

    stub = scheduler_stub(servers["scheduler"], material(federation, "node-1"))
    stub.Report(pb.StatusReport(party="node-1", state="training", round=2, step=7, has_loss=True, loss=1.5,
                                has_eval_loss=True, eval_loss=2.25, eval_samples=4), timeout=5)
    assert metrics.TRAIN_LOSS.labels(party="node-1")._value.get() == 1.5
    assert metrics.EVAL_LOSS.labels(party="node-1")._value.get() == 2.25
    assert metrics.ROUND.labels(party="node-1")._value.get() == 2
