"""HMAC_DRBG against the NIST CAVP known answers, and its request limits."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedtune.secagg import SecAggError
from fedtune.secagg.drbg import MAX_REQUEST_BYTES, HmacDrbg

DATA = Path(__file__).resolve().parent / "data"


def _cavp_cases() -> list[tuple[str, dict[str, str], list[bytes]]]:
    """(hash, fields, [additional inputs]) for every COUNT of the .rsp subset, in the CAVP file's layout."""
    cases, method = [], None
    for block in re.split(r"\n\s*\n", (DATA / "HMAC_DRBG_no_reseed_subset.rsp").read_text()):
        if header := re.search(r"\[SHA-(\d+)\]", block):
            method = f"sha{header.group(1)}"
            continue
        if not block.startswith("COUNT"):
            continue
        fields, additional = {}, []
        for line in block.splitlines():
            key, _, value = (part.strip() for part in line.partition("="))
            if key == "AdditionalInput":
                additional.append(bytes.fromhex(value))
            else:
                fields[key] = value
        cases.append((method, fields, additional))
    return cases


CASES = _cavp_cases()


def test_the_subset_covers_both_hashes_with_and_without_inputs() -> None:
    assert {m for m, _, _ in CASES} == {"sha256", "sha512"}
    assert any(ai[0] for _, _, ai in CASES) and any(f["PersonalizationString"] for _, f, _ in CASES)


@pytest.mark.parametrize(("method", "fields", "additional"), CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_matches_nist_cavp_vector(method: str, fields: dict[str, str], additional: list[bytes]) -> None:
    drbg = HmacDrbg(
        method,
        bytes.fromhex(fields["EntropyInput"]),
        bytes.fromhex(fields["Nonce"]),
        bytes.fromhex(fields["PersonalizationString"]),
    )
    expected = bytes.fromhex(fields["ReturnedBits"])
    drbg.generate(len(expected), additional[0])  # CAVS: the first output is discarded
    assert drbg.generate(len(expected), additional[1]) == expected


def test_request_limit_and_bad_parameters_are_errors() -> None:
    drbg = HmacDrbg("sha256", bytes(32))
    assert len(drbg.generate(MAX_REQUEST_BYTES)) == MAX_REQUEST_BYTES
    with pytest.raises(SecAggError, match="at most 65536"):
        drbg.generate(MAX_REQUEST_BYTES + 1)
    with pytest.raises(SecAggError, match=r"csprng\.method"):
        HmacDrbg("sha1", bytes(32))
    with pytest.raises(SecAggError, match="entropy"):
        HmacDrbg("sha512", bytes(16))
