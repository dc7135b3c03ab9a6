"""Secure aggregation inside whole jobs: same result as plain, restarts, and a relay that swaps keys."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedtune.federation import transport
from fedtune.federation.proto import fedtune_pb2_grpc as pb_grpc
from fedtune.federation.scheduler import SchedulerService
from fedtune.local.launcher import LocalJob
from fedtune.spec import load_job
from support.jobs import (
    PARTIES,
    adapter_tensors,
    assert_identical_adapters,
    kill_after_first_round,
    run_cli,
    wait_until,
    write_job,
)

pytestmark = pytest.mark.slow
OTP = {
    "otp": {
        "key_bitlength": 64,
        "key_exchange": {"key_bitlength": 2048, "optimized": True},
        "csprng": {"name": "hmac_drbg", "method": "sha512"},
    }
}
OTP_FAST = {"otp": {"key_bitlength": 128, "key_exchange": {"curve": "x25519"}, "csprng": {"name": "chacha20"}}}
# Round 1's global adapter: the fixed-point sum of 3 updates is off by at most 3 * 2^-32 per weight before
# it is rounded to float32, so the two results differ by at most that plus float32 rounding of the value.
FIXED_POINT_BOUND = 3 * 2.0**-32


def run(job: Path, out: Path) -> str:
    done = run_cli("run", str(job), "--output", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_otp_job_matches_plain_within_fixed_point_precision(tmp_path: Path, tiny_model: Path) -> None:
    plain = write_job(tmp_path / "plain", tiny_model, epochs=1)
    otp = write_job(tmp_path / "otp", tiny_model, encryption=OTP, epochs=1)
    run(plain, tmp_path / "plain-out")
    run(otp, tmp_path / "otp-out")
    for party in PARTIES:
        a = adapter_tensors(tmp_path / "plain-out" / party / "checkpoint-0.5")
        b = adapter_tensors(tmp_path / "otp-out" / party / "checkpoint-0.5")
        assert a.keys() == b.keys()
        for name in a:
            x, y = a[name].double().numpy(), b[name].double().numpy()
            bound = FIXED_POINT_BOUND + np.abs(x) * np.finfo(np.float32).eps
            assert np.all(np.abs(x - y) <= bound), f"{party}: {name} differs by {np.abs(x - y).max():.3g}"
    assert_identical_adapters(tmp_path / "otp-out", "checkpoint-1")


def test_label_trainer_restarted_under_otp_still_decodes(tmp_path: Path, tiny_model: Path) -> None:
    job_path = write_job(
        tmp_path / "job", tiny_model, encryption=OTP_FAST, sizes=(16, 160, 16), agg_steps=0.25, epochs=1
    )
    local = LocalJob(load_job(job_path), tmp_path / "out", job_path.parent)
    try:
        local.start()
        kill_after_first_round(local)
        wait_until(local.finished, 300, "the job to finish after the restart", local)
        assert local.status().phase == "Succeeded"
    finally:
        local.stop()
    final = [adapter_tensors(tmp_path / "out" / p / "checkpoint-1") for p in PARTIES]
    for tensors in final:
        # Masks that failed to cancel decode to values near +-2^31, not to adapter weights.
        assert all(float(t.abs().max()) < 100 for t in tensors.values())
    assert_identical_adapters(tmp_path / "out", "checkpoint-1")


class TamperingScheduler(SchedulerService):
    """A compromised relay: it alters node-1's key-agreement value in what it hands node-2."""

    async def Ready(self, request, context):
        reply = await super().Ready(request, context)
        if request.party == "node-2" and "node-1" in reply.public_keys:
            key = bytearray(reply.public_keys["node-1"])
            key[-1] ^= 0x01
            reply.public_keys["node-1"] = bytes(key)
        return reply


def test_altered_key_agreement_value_fails_the_job(tmp_path: Path, tiny_model: Path) -> None:
    job_path = write_job(tmp_path / "job", tiny_model, encryption=OTP_FAST)
    local = LocalJob(load_job(job_path), tmp_path / "out", job_path.parent)
    server = None
    try:
        local.start(skip=("scheduler",))
        tls_dir = local.tls_dir("scheduler")
        tls = transport.TlsMaterial(*((tls_dir / n).read_bytes() for n in ("ca.crt", "tls.crt", "tls.key")))
        server, _ = transport.make_server(f"127.0.0.1:{local.roles['scheduler'].listen_port}", tls)
        job = local.resolved
        local.state.init(len(job.spec.fractions()), {p.name: p.role for p in job.spec.parties})
        identity = transport.PeerIdentity(p.name for p in job.spec.parties)
        pb_grpc.add_SchedulerServicer_to_server(TamperingScheduler(job, local.state, identity), server)
        server.start()
        wait_until(lambda: local.state.phase() == "Failed", 240, "the job to fail")
        error = local.state.error()
        wait_until(lambda: local.roles["node-2"].proc.poll() is not None, 60, "node-2 to stop")
    finally:
        if server is not None:
            server.stop(0)
        local.stop()
    assert "node-2" in error and "altered in transit" in error
    assert local.roles["node-2"].proc.returncode != 0
    assert "altered in transit" in local.roles["node-2"].log_path.read_text()
    assert not list((tmp_path / "out").glob("*/checkpoint-*")), "nothing may be aggregated with a swapped key"
