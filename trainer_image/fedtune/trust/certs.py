"""The federation's certificates: a CA, one certificate per party, and signatures over key-agreement keys.

A party's certificate names it (a DNS SAN, and the common name), so a server can tell which
party is calling and the party's peers can check that a relayed key-agreement public value
really comes from it. The SAN holds the name whole; a common name longer than X.509's 64
characters is cut (`_common_name`), so long namespaces and job names never break a
certificate. Keys are ECDSA P-256: small, fast, and what gRPC's TLS handles well.
"""

from __future__ import annotations

import datetime as dt
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

CA_FILE, CERT_FILE, KEY_FILE = "ca.crt", "tls.crt", "tls.key"
_VALID = dt.timedelta(days=365)
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
          valid: dt.timedelta = _VALID) -> Issued:
    """A certificate naming party `name` (its first DNS SAN), good for both ends of mutual TLS."""
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
    cert = x509.load_pem_x509_certificate(cert_pem)
    common = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return list(dict.fromkeys(common + _alt_names(cert).get_values_for_type(x509.DNSName)))


def describe(cert_pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem)
    names = [str(n.value) for n in _alt_names(cert)]
    return (f"subject: {cert.subject.rfc4514_string()}\nissuer:  {cert.issuer.rfc4514_string()}\n"
            f"names:   {', '.join(names) or '-'}\nvalid:   {cert.not_valid_before_utc:%Y-%m-%d} .. "
            f"{cert.not_valid_after_utc:%Y-%m-%d}\nserial:  {cert.serial_number:x}")


# --- signed key-agreement public values ---------------------------------------------------


def _signed_message(job_id: str, party: str, public_key: bytes) -> bytes:
    # Binding job and party stops a signed value being replayed for another job or party.
    return b"fedtune-key-agreement\x00" + job_id.encode() + b"\x00" + party.encode() + b"\x00" + public_key


def sign_public_key(key_pem: bytes, job_id: str, party: str, public_key: bytes) -> bytes:
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError("only ECDSA party keys can sign key-agreement values")
    return key.sign(_signed_message(job_id, party, public_key), ec.ECDSA(hashes.SHA256()))


def verify_public_key(ca_pem: bytes, cert_pem: bytes, job_id: str, party: str, public_key: bytes,
                      signature: bytes) -> None:
    """Raise CertError unless `public_key` was signed by `party`'s certificate from this federation's CA."""
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
        cert = x509.load_pem_x509_certificate(cert_pem)
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise CertError(f"{party}'s certificate is not from this federation's CA ({err or 'bad signature'})") from None
    if party not in names(cert_pem):
        raise CertError(f"the certificate sent for {party} names {', '.join(f'`{n}`' for n in names(cert_pem))}")
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise CertError(f"{party}'s certificate does not hold an ECDSA key")
    try:
        public.verify(signature, _signed_message(job_id, party, public_key), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise CertError(
            f"the key-agreement public value relayed for {party} does not carry {party}'s signature: "
            "it was altered in transit; refusing to aggregate"
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
