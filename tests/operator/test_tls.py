"""Certificates on Kubernetes: a usable CA, and no certificate that names another party."""

from __future__ import annotations

import pytest

from fedtune import certs
from fedtune_operator import tls
from fedtune_operator.children import problems
from support.children import b64, make_job


def test_an_unusable_ca_secret_is_explained() -> None:
    ca, other = certs.make_ca("a"), certs.make_ca("b")
    with pytest.raises(tls.TlsUnavailable, match="not found"):
        tls.read_ca(None, "spec.tls.caSecret `x`")
    with pytest.raises(tls.TlsUnavailable, match=r"no ca\.key"):
        tls.read_ca({"data": {"ca.crt": b64(ca.cert_pem)}}, "x")
    with pytest.raises(tls.TlsUnavailable, match="usable CA"):
        tls.read_ca({"data": {"ca.crt": b64(ca.cert_pem), "ca.key": b64(other.key_pem)}}, "x")
    with pytest.raises(tls.TlsUnavailable, match="usable CA"):
        tls.read_ca({"data": {"ca.crt": b64(b"junk"), "ca.key": b64(ca.key_pem)}}, "x")


def test_a_service_name_that_is_another_partys_name_is_refused(example) -> None:
    # node-1's certificate carries its Service name, poems-lora-node-1: a party of that name
    # could be impersonated by node-1.
    example["spec"]["parties"][2]["name"] = "poems-lora-node-1"
    found = problems(make_job(example))
    assert any("`poems-lora-node-1`" in p and "could act as" in p for p in found), found
    example["spec"]["tls"] = {"enabled": False}
    assert problems(make_job(example)) == []
