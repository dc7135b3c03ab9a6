"""What a party checks in the start the scheduler relays, and the run's session id.

The scheduler relays every party's signed key bundle (`fedtune.trust.certs.KeyBundle`: key-agreement
value, nonce, terms digest). A party trusts none of it for being relayed: it takes its peers from its
own job file, and refuses (`TermsRefused`) when the relay adds a party, leaves one out, carries another
digest, or a bundle whose signature, certificate or pinned key does not check out. A missing peer is a
refusal under both masking schemes: SecAgg+ deals every holder shares of every secret before round 1,
so it cannot start without one (a peer that stops uploading later is a secagg_plus dropout).

The session id hashes the terms digest with every party's nonce, each drawn fresh for the run (and kept
in the party's state folder, so a restarted party rejoins the same session): masks and share keys are
derived under it, so a job re-created with the same name never shares them with an earlier run.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fedtune import files
from fedtune.federation.proto import fedtune_pb2 as pb
from fedtune.federation.transport import TlsMaterial
from fedtune.spec import JobSpec
from fedtune.spec.terms import TermsRefused
from fedtune.trust import certs

NONCE_BYTES = 32
NONCE_FILE = "session.nonce"


def nonce(state_dir: Path) -> bytes:
    """This party's nonce for the run: drawn from the OS once, then read back after a restart."""
    path = state_dir / NONCE_FILE
    if path.exists():
        return path.read_bytes()
    value = os.urandom(NONCE_BYTES)
    files.write_atomic(path, value, mode=0o600)
    return value


def session_id(terms_digest: str, nonces: dict[str, bytes]) -> str:
    """`sha256:<hex>` over the digest and each party's nonce, in the order of the parties' names."""
    h = hashlib.sha256(b"fedtune session\0" + terms_digest.encode())
    for party in sorted(nonces):
        h.update(len(party).to_bytes(4, "big") + party.encode() + len(nonces[party]).to_bytes(4, "big"))
        h.update(nonces[party])
    return "sha256:" + h.hexdigest()


def check_start(start: pb.StartInfo, spec: JobSpec, me: str, terms_digest: str, job_id: str,
                tls: TlsMaterial | None) -> str:
    """Every party of this party's own job file, and only those, with the terms it agreed to and (under
    TLS) a bundle signed by the key that may speak for it; the session id. TermsRefused otherwise."""
    mine = {p.name for p in spec.parties}
    relayed = set(start.nonces)
    added, dropped = sorted(relayed - mine), sorted(mine - relayed)
    if added:
        raise TermsRefused(f"refusing to train: the scheduler relayed key bundles of {', '.join(added)}, which "
                           "this party's job file does not name")
    if dropped:
        raise TermsRefused(f"refusing to train: the scheduler relayed no key bundle of {', '.join(dropped)}, "
                           "which this party's job file names; no party trains with fewer peers than its file names")
    for party in sorted(mine - {me}):
        if start.terms_digests[party] != terms_digest:
            raise TermsRefused(f"refusing to train: {party} agreed to terms {start.terms_digests[party]}, this "
                               f"party's job file gives {terms_digest}")
        if tls is not None:
            _check_bundle(start, spec, party, terms_digest, job_id, tls)
    return session_id(terms_digest, dict(start.nonces))


def _check_bundle(start: pb.StartInfo, spec: JobSpec, party: str, terms_digest: str, job_id: str,
                  tls: TlsMaterial) -> None:
    bundle = certs.KeyBundle(party, start.public_keys.get(party, b""), start.nonces[party], terms_digest)
    try:
        certs.verify_bundle(tls.ca, start.certificates.get(party, b""), job_id, bundle,
                            start.public_key_signatures.get(party, b""), pin=spec.party(party).identity,
                            revoked=spec.tls.revoked)
    except certs.CertError as err:
        raise TermsRefused(f"refusing to train: {err}") from None
