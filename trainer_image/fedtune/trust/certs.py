"""The federation's certificates: CAs, one certificate per party, identities, and signed key bundles.

A party's certificate names it (a DNS SAN, and the common name), so a server can tell which
party is calling and the party's peers can check that a relayed key bundle really comes from
it. The SAN holds the name whole; a common name longer than X.509's 64 characters is cut
(`_common_name`), so long namespaces and job names never break a certificate. Keys are ECDSA
P-256: small, fast, and what gRPC's TLS handles well.

A party's identity is the SHA-256 of its certificate's public key (SubjectPublicKeyInfo,
`fingerprint`): a job file may pin it (`parties[].identity`), and then only that key speaks for
the party, whichever CA of the bundle signed it. `ca.crt` may hold several organisations' CAs.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune import files
from fedtune.spec.common import IDENTITY_PREFIX

CA_FILE, CERT_FILE, KEY_FILE = "ca.crt", "tls.crt", "tls.key"
_VALID = dt.timedelta(days=365)  # a CA
JOB_CERT_VALID = dt.timedelta(days=30)  # a party's certificate: short-lived, re-issued for a new job
_COMMON_NAME_MAX = 64  # X.509's bound (RFC 5280's ub-common-name); cryptography refuses longer ones


class CertError(ValueError):
    """A certificate or signature that cannot be trusted; the message says whose and why."""


@dataclass(frozen=True)
class Issued:
    cert_pem: bytes
    key_pem: bytes


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _common_name(text: str) -> x509.Name:
    """A subject whose common name is `text`, cut to 64 characters when longer: the cut keeps a digest
    of the whole, so two long names that share their first 55 characters still differ."""
    if len(text) > _COMMON_NAME_MAX:
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        text = f"{text[:_COMMON_NAME_MAX - len(digest) - 1]}~{digest}"
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def make_ca(name: str, *, valid: dt.timedelta = _VALID) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _common_name(f"fedtune CA {name}")
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + valid)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue(ca: Issued, name: str, *, dns_names: list[str] = (), ips: list[str] = (),  # type: ignore[assignment]
          valid: dt.timedelta = JOB_CERT_VALID) -> Issued:
    """A certificate naming party `name` (its first DNS SAN), good for both ends of mutual TLS and for
    signing its key bundles."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dict.fromkeys([name, *dns_names])]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder().subject_name(_common_name(name))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5)).not_valid_after(_now() + valid)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def write_bundle(folder: Path, ca_pem: bytes, issued: Issued) -> Path:
    """ca.crt, tls.crt, tls.key: the layout `--tls-dir` and Kubernetes TLS Secrets use."""
    files.write_atomic(folder / CA_FILE, ca_pem)
    files.write_atomic(folder / CERT_FILE, issued.cert_pem)
    files.write_atomic(folder / KEY_FILE, issued.key_pem, mode=0o600)
    return folder


def _alt_names(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return x509.SubjectAlternativeName([])


def names(cert_pem: bytes) -> list[str]:
    """The names a certificate carries: its common name, then its DNS SANs (as `transport.peer_names` sees them).

    A name longer than a common name may be lives in the SANs alone (`issue` puts it first there)."""
    return _names(x509.load_pem_x509_certificate(cert_pem))


def _names(cert: x509.Certificate) -> list[str]:
    common = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return list(dict.fromkeys(common + _alt_names(cert).get_values_for_type(x509.DNSName)))


def describe(cert_pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem)
    names = [str(n.value) for n in _alt_names(cert)]
    return (f"subject: {cert.subject.rfc4514_string()}\nissuer:  {cert.issuer.rfc4514_string()}\n"
            f"names:   {', '.join(names) or '-'}\nvalid:   {cert.not_valid_before_utc:%Y-%m-%d %H:%M} .. "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC\nserial:  {cert.serial_number:x}\n"
            f"identity: {fingerprint(cert_pem)}")


# --- identities and checks --------------------------------------------------------------


def _load(cert_pem: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(cert_pem)
    except ValueError as err:
        raise CertError(f"{what}: not a PEM certificate ({err})") from None


def fingerprint(cert_pem: bytes) -> str:
    """The identity of a certificate's key: `sha256:<hex>` of its SubjectPublicKeyInfo (stays with the key
    when the certificate is renewed by the same key, changes when the key does)."""
    return _fingerprint(_load(cert_pem, "certificate"))


def _fingerprint(cert: x509.Certificate) -> str:
    return _identity(cert.public_key())


def _identity(public_key: object) -> str:
    spki = public_key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    return IDENTITY_PREFIX + hashlib.sha256(spki).hexdigest()


@functools.lru_cache(maxsize=8)
def _parse_bundle(ca_pem: bytes) -> tuple[x509.Certificate, ...]:
    try:
        return tuple(x509.load_pem_x509_certificates(ca_pem))
    except ValueError:
        return ()


def ca_bundle(ca_pem: bytes, what: str = "ca.crt") -> tuple[x509.Certificate, ...]:
    """The CA certificates of a bundle (one organisation's or several), each a CA and valid now."""
    cas = _parse_bundle(ca_pem)  # a party checks every peer against the same bundle: parsed once
    if not cas:
        raise CertError(f"{what}: holds no CA certificate")
    for ca in cas:
        if not _is_ca(ca):
            raise CertError(f"{what}: `{ca.subject.rfc4514_string()}` is not a CA certificate (basicConstraints)")
        try:
            _check_dates(ca, what)
        except CertError as err:  # named only when it fails: a party checks every peer against the bundle
            raise CertError(f"{err} ({ca.subject.rfc4514_string()})") from None
    return cas


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _check_dates(cert: x509.Certificate, what: str) -> None:
    now = _now()
    if now < cert.not_valid_before_utc:
        raise CertError(f"{what}: not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    if now > cert.not_valid_after_utc:
        raise CertError(f"{what}: expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")


def _check_usage(cert: x509.Certificate, what: str) -> None:
    """A party certificate: not a CA, may sign (key usage), may act as a TLS client and server."""
    if _is_ca(cert):
        raise CertError(f"{what}: is a CA certificate, not a party's")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.digital_signature:
            raise CertError(f"{what}: its key usage does not allow digital signatures")
    except x509.ExtensionNotFound:
        pass  # no restriction
    try:
        extended = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.CLIENT_AUTH not in extended or ExtendedKeyUsageOID.SERVER_AUTH not in extended:
            raise CertError(f"{what}: its extended key usage lacks TLS client or server authentication")
    except x509.ExtensionNotFound:
        pass


def check_party_certificate(ca_pem: bytes, cert_pem: bytes, party: str, *, pin: str | None = None,
                            revoked: tuple[str, ...] | list[str] = (), what: str | None = None) -> None:
    """Raise CertError unless `cert_pem` may speak for `party`: issued by a CA of the bundle, valid now,
    usable for signing and TLS, naming `party`; with the key `pin` names when pinned; not revoked."""
    what = what or f"{party}'s certificate"
    cert = _load(cert_pem, what)
    if not any(_issued_by(cert, ca) for ca in ca_bundle(ca_pem)):
        raise CertError(f"{what}: not issued by a CA of this party's ca.crt")
    _check_dates(cert, what)
    _check_usage(cert, what)
    carried = _names(cert)
    if party not in carried:
        raise CertError(f"{what} names {', '.join(f'`{n}`' for n in carried)}, not `{party}`")
    identity = _fingerprint(cert)
    if pin is not None and identity != pin:
        raise CertError(f"{what}: its key is {identity}, but the job file pins {party} to {pin}")
    if identity in revoked:
        raise CertError(f"{what}: its key {identity} is revoked (spec.tls.revoked)")


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    if cert.issuer != ca.subject:  # cheap, before the signature
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def check_own_material(ca_pem: bytes, cert_pem: bytes, key_pem: bytes, party: str, *, source: str,
                       pin: str | None = None) -> None:
    """A role's own --tls-dir at start: every problem named with the file, before anything is served."""
    ca_bundle(ca_pem, f"{source}/{CA_FILE}")
    check_party_certificate(ca_pem, cert_pem, party, pin=pin, what=f"{source}/{CERT_FILE}")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as err:
        raise CertError(f"{source}/{KEY_FILE}: not a PEM private key ({err})") from None
    if _identity(key.public_key()) != fingerprint(cert_pem):
        raise CertError(f"{source}/{KEY_FILE}: is not the key of {CERT_FILE}")


# --- signed key bundles --------------------------------------------------------------------


@dataclass(frozen=True)
class KeyBundle:
    """What a party publishes at the start: its key-agreement value (empty without masking), its fresh
    nonce for the run's session, and the digest of the terms it agreed to; all signed by its key."""

    party: str
    public_key: bytes
    nonce: bytes
    terms_digest: str


def _signed_message(job_id: str, bundle: KeyBundle) -> bytes:
    # Binding job and party stops a signed bundle being replayed for another job or party; the nonce
    # binds it to this run, the digest to these terms.
    fields = [b"fedtune-key-bundle", job_id.encode(), bundle.party.encode(), bundle.terms_digest.encode(),
              bundle.nonce, bundle.public_key]
    return b"".join(len(f).to_bytes(4, "big") + f for f in fields)


def sign_bundle(key_pem: bytes, job_id: str, bundle: KeyBundle) -> bytes:
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError("only ECDSA party keys can sign key bundles")
    return key.sign(_signed_message(job_id, bundle), ec.ECDSA(hashes.SHA256()))


def verify_bundle(ca_pem: bytes, cert_pem: bytes, job_id: str, bundle: KeyBundle, signature: bytes, *,
                  pin: str | None = None, revoked: tuple[str, ...] | list[str] = ()) -> None:
    """Raise CertError unless `bundle` was signed by the key that may speak for its party (see
    `check_party_certificate`)."""
    party = bundle.party
    check_party_certificate(ca_pem, cert_pem, party, pin=pin, revoked=revoked,
                            what=f"the certificate sent for {party}")
    public = x509.load_pem_x509_certificate(cert_pem).public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise CertError(f"{party}'s certificate does not hold an ECDSA key")
    try:
        public.verify(signature, _signed_message(job_id, bundle), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise CertError(
            f"the key bundle relayed for {party} does not carry {party}'s signature: it was altered in transit; "
            "refusing to aggregate"
        ) from None


# --- signed protocol statements (SecAgg+'s consistency check) -----------------------------


def sign_statement(key_pem: bytes, statement: bytes) -> bytes:
    """The party's signature over a protocol statement (which names its own domain, job and round)."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError("only ECDSA party keys can sign protocol statements")
    return key.sign(statement, ec.ECDSA(hashes.SHA256()))


def statement_signed(cert_pem: bytes, statement: bytes, signature: bytes) -> bool:
    """Whether `signature` over `statement` was made with the key of `cert_pem` (a certificate already
    checked against the federation, as the party flow checks each peer's at the start)."""
    try:
        public = x509.load_pem_x509_certificate(cert_pem).public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            return False
        public.verify(signature, statement, ec.ECDSA(hashes.SHA256()))
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
