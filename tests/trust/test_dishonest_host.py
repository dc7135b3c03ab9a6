"""A dishonest host: its scheduler and assist_trainer run from a job file of their own, or its scheduler
tampers with what it relays. Real processes, real gRPC over mutual TLS, a real Redis.

Each time every honest label_trainer refuses (exit code EXIT_REFUSED, its error naming what differs) before
any update leaves it: the host's Redis, where the aggregator keeps everything it received (updates,
secagg_plus shares), holds nothing from an honest party. A host file that differs only in local fields
trains as before."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedtune.exits import EXIT_REFUSED
from fedtune.federation import transport
from fedtune.federation.proto import fedtune_pb2 as pb
from fedtune.federation.proto import fedtune_pb2_grpc as pb_grpc
from fedtune.federation.scheduler import SchedulerService
from fedtune.local.launcher import LocalJob
from fedtune.spec import dump_job, load_job
from support.jobs import assert_identical_adapters, wait_until, write_job

pytestmark = pytest.mark.slow
HONEST = ("node-1", "node-2")
HOST = ("scheduler", "assist_trainer")
OTP = {"otp": {"key_bitlength": 64, "key_exchange": {"curve": "x25519"}, "csprng": {"name": "chacha20"}}}
DP = {"dp": {"clip_norm": 1.0, "noise_multiplier": 0.5}}


def received_from_honest(local: LocalJob) -> list[str]:
    """What the host's aggregator holds of an honest party: submitted updates (any round), shares."""
    held = [f"round {r}: {p}" for r in range(1, len(local.job.spec.fractions()) + 1)
            for p in local.state.updates(r) if p in HONEST]
    return held + [f"shares: {p}" for p in local.state.shares() if p in HONEST]


def host_file(local: LocalJob, edit: Callable[[dict[str, Any]], None]) -> Path:
    """The run's resolved job (same addresses, same pinned keys) with the host's edit."""
    data = yaml.safe_load(dump_job(local.resolved))
    edit(data["spec"])
    path = local.run_dir / "host-job.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def wait_exits(local: LocalJob, names: tuple[str, ...], timeout: float = 240) -> dict[str, int]:
    wait_until(lambda: all(local.roles[n].proc.poll() is not None for n in names), timeout,
               f"{', '.join(names)} to exit")
    return {n: local.roles[n].proc.returncode for n in names}


def assert_refused(local: LocalJob, codes: dict[str, int], expected: str) -> None:
    for name in HONEST:
        log = local.roles[name].log_path.read_text()
        assert codes[name] == EXIT_REFUSED, f"{name} exited with {codes[name]}:\n{log[-3000:]}"
        assert "refusing to train" in log and expected in log, log[-3000:]
        assert "Traceback" not in log
    assert received_from_honest(local) == []
    assert not list(local.output.glob("node-*/checkpoint-*"))


HOST_EDITS: dict[str, tuple[Callable[[dict], None], str]] = {
    "downgrade encryption": (lambda s: s.update(encryption={"plain": {}}), "encryption.plain: mine absent, theirs {}"),
    "drop dp": (lambda s: s["privacy"].pop("dp"), "privacy.dp.clip_norm: mine 1.0, theirs absent"),
    "change rounds": (lambda s: s["aggregation"].update(agg_steps=1.0), "aggregation.agg_steps: mine 0.5, theirs 1.0"),
    "change peft": (lambda s: s["peft"]["LORA"].update(r=2), "peft.LORA.r: mine 4, theirs 2"),
}


def start_with_host_file(local: LocalJob, edit: Callable[[dict], None]) -> None:
    """The host's roles from a job file changed by `edit`, the honest parties from the run's own."""
    local.start(skip=(*HOST, *HONEST))
    host = host_file(local, edit)
    for name in HOST:
        local.start_role(name, job_file=host)
    for name in HONEST:
        local.start_role(name)


@pytest.mark.parametrize("case", sorted(HOST_EDITS))
def test_host_with_other_terms_is_refused_by_every_honest_party(tmp_path: Path, tiny_model: Path, case: str) -> None:
    edit, expected = HOST_EDITS[case]
    job = write_job(tmp_path / "job", tiny_model, encryption=OTP, privacy=DP)
    local = LocalJob(load_job(job), tmp_path / "out", job.parent)
    try:
        start_with_host_file(local, edit)
        codes = wait_exits(local, HONEST)
        assert_refused(local, codes, expected)
        assert "terms differ" in local.state.error()
    finally:
        local.stop()


class TamperingScheduler(SchedulerService):
    """A compromised relay: `tamper(recipient, reply)` alters the start each party is handed, and it hides
    a party's refusal from the others (it never tells them the job failed)."""

    def __init__(self, *args: Any, tamper: Callable[[str, Any], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tamper = tamper

    async def _wait_for(self, fetch, wait_s):
        return await self.wakeup.until(fetch, min(max(wait_s, 0.0), 30.0), tick_s=0.05)  # never says "failed"

    async def Ready(self, request, context):
        reply = await super().Ready(request, context)
        if reply.ready:
            self.tamper(request.party, reply)
        return reply


def add_party(recipient: str, reply: Any) -> None:
    reply.nonces["node-9"] = b"\x01" * 32
    reply.terms_digests["node-9"] = reply.terms_digests[recipient]
    reply.public_keys["node-9"] = reply.public_keys[recipient]


def drop_party(recipient: str, reply: Any) -> None:
    other = next(p for p in HONEST if p != recipient)
    for field in (reply.nonces, reply.terms_digests, reply.public_keys, reply.certificates,
                  reply.public_key_signatures):
        field.pop(other, None)


def swap_bundle(recipient: str, reply: Any) -> None:
    """Hand each party a key-agreement value of the host's instead of its peer's."""
    other = next((p for p in HONEST if p != recipient), None)
    if other in reply.public_keys:
        key = bytearray(reply.public_keys[other])
        key[-1] ^= 0x01
        reply.public_keys[other] = bytes(key)


RELAY_TAMPERING = {
    "add a party": (add_party, "relayed key bundles of node-9, which this party's job file does not name"),
    "drop a party": (drop_party, "relayed no key bundle of node-"),
    "swap a key bundle": (swap_bundle, "altered in transit"),
}


@pytest.mark.parametrize("case", sorted(RELAY_TAMPERING))
def test_relay_that_adds_drops_or_swaps_is_refused_by_every_honest_party(tmp_path: Path, tiny_model: Path,
                                                                         case: str) -> None:
    tamper, expected = RELAY_TAMPERING[case]
    job_path = write_job(tmp_path / "job", tiny_model, encryption=OTP)
    local = LocalJob(load_job(job_path), tmp_path / "out", job_path.parent)
    server = None
    try:
        local.start(skip=("scheduler",))
        server = serve_scheduler(local, TamperingScheduler, tamper=tamper)
        codes = wait_exits(local, HONEST)
        assert_refused(local, codes, expected)
    finally:
        if server is not None:
            server.stop(0)
        local.stop()


class EchoingScheduler(TamperingScheduler):
    """A host that lies at Join: it hands every party that party's own terms back and never fails the job."""

    async def Join(self, request, context):
        self._caller(request.party, context)
        return pb.JoinReply(ready=True, job_id=self.job.job_id, terms_json=request.terms_json)


def test_host_that_lies_at_join_is_caught_by_its_signed_digest(tmp_path: Path, tiny_model: Path) -> None:
    """The scheduler echoes each party's terms; the assist_trainer runs from a file without encryption. Its
    signed key bundle carries its real digest: the honest parties refuse before sending anything."""
    job_path = write_job(tmp_path / "job", tiny_model, encryption=OTP)
    local = LocalJob(load_job(job_path), tmp_path / "out", job_path.parent)
    server = None
    try:
        local.start(skip=("scheduler", "assist_trainer", *HONEST))
        server = serve_scheduler(local, EchoingScheduler, tamper=lambda recipient, reply: None)
        local.start_role("assist_trainer", job_file=host_file(local, HOST_EDITS["downgrade encryption"][0]))
        for name in HONEST:
            local.start_role(name)
        codes = wait_exits(local, HONEST)
        assert_refused(local, codes, "assist_trainer agreed to terms sha256:")
    finally:
        if server is not None:
            server.stop(0)
        local.stop()


def serve_scheduler(local: LocalJob, kind: type[SchedulerService], **kwargs: Any) -> Any:
    """A scheduler of class `kind` in this process, on the run's scheduler port, with its certificate."""
    tls_dir = local.tls_dir("scheduler")
    tls = transport.TlsMaterial(*((tls_dir / n).read_bytes() for n in ("ca.crt", "tls.crt", "tls.key")))
    server, _ = transport.make_server(f"127.0.0.1:{local.roles['scheduler'].listen_port}", tls)
    job = local.resolved
    local.state.init(len(job.spec.fractions()), {p.name: p.role for p in job.spec.parties})
    pb_grpc.add_SchedulerServicer_to_server(kind(job, local.state, transport.PeerIdentity.of(job.spec), **kwargs),
                                            server)
    server.start()
    return server


def test_host_file_differing_only_in_local_fields_trains(tmp_path: Path, tiny_model: Path) -> None:
    def local_only(spec: dict) -> None:
        spec["aggregation"]["round_timeout_s"] = 90
        spec["backoffLimit"] = 0
        spec["parties"][0]["trainer"] = {"per_device_train_batch_size": 2}

    job = write_job(tmp_path / "job", tiny_model, encryption=OTP, agg_steps=1.0, epochs=1)
    local = LocalJob(load_job(job), tmp_path / "out", job.parent)
    try:
        start_with_host_file(local, local_only)
        codes = wait_exits(local, (*HOST, *HONEST), timeout=400)
        assert codes == dict.fromkeys((*HOST, *HONEST), 0), local.state.error()
    finally:
        local.stop()
    assert_identical_adapters(tmp_path / "out", "checkpoint-1")
