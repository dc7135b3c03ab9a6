"""Two organisations, each with its own CA and keys (no CA key shared), every party pinned: a job trains,
real processes over mutual TLS, each role started as a host of its organisation would start it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedtune.local.launcher import LocalJob
from fedtune.spec import dump_job, load_job
from fedtune.trust import certs
from support.jobs import assert_identical_adapters, wait_until, write_job

pytestmark = pytest.mark.slow
OTP = {"otp": {"key_bitlength": 64, "key_exchange": {"curve": "x25519"}, "csprng": {"name": "chacha20"}}}
ORGS = {"host": ("scheduler", "assist_trainer", "node-1"), "guest": ("node-2",)}


def provision(local: LocalJob) -> dict[str, str]:
    """Each organisation's CA signs its own roles' certificates; every role trusts both CAs. Identities."""
    cas = {org: certs.make_ca(org) for org in ORGS}
    bundle = b"".join(ca.cert_pem for ca in cas.values())
    identities = {}
    for org, names in ORGS.items():
        for name in names:
            issued = certs.issue(cas[org], name, dns_names=["localhost"], ips=["127.0.0.1"])
            certs.write_bundle(local.tls_dir(name), bundle, issued)
            identities[name] = certs.fingerprint(issued.cert_pem)
    return identities


def test_two_organisations_with_their_own_cas_and_pins_train(tmp_path: Path, tiny_model: Path) -> None:
    job = write_job(tmp_path / "job", tiny_model, encryption=OTP, agg_steps=1.0, epochs=1)
    local = LocalJob(load_job(job), tmp_path / "out", job.parent)
    roles = [name for names in ORGS.values() for name in names]
    try:
        local.start(skip=tuple(roles))
        identities = provision(local)
        data = yaml.safe_load(dump_job(local.resolved))
        for party in data["spec"]["parties"]:
            party["identity"] = identities[party["name"]]
        local.job_file.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
        for name in roles:
            local.start_role(name)
        wait_until(lambda: all(local.roles[n].proc.poll() is not None for n in roles), 400, "the job to end", local)
        codes = {n: local.roles[n].proc.returncode for n in roles}
        assert codes == dict.fromkeys(roles, 0), local.state.error()
    finally:
        local.stop()
    assert_identical_adapters(tmp_path / "out", "checkpoint-1")
