"""`kubectl logs` for the node: the kubelet's /containerLogs endpoint, and nothing else.

The API server proxies `kubectl logs` to `https://<node InternalIP>:<kubeletEndpoint
port>/containerLogs/<ns>/<pod>/<container>`. Without --kubelet-certificate-authority it
does not verify the kubelet's certificate, and without a kubelet client certificate it
calls anonymously: a self-signed certificate made at start is all this needs. It
listens on the bridge's address, which only the host and the pods reach.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# (namespace, pod, container, previous) -> (log file, still being written) or None.
LogLookup = Callable[[str, str, str, bool], "tuple[Path, Callable[[], bool]] | None"]


def self_signed(folder: Path, address: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtune-nodeagent")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]), False)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "kubelet.crt", folder / "kubelet.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.touch(0o600)
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def _tail_offset(path: Path, lines: int) -> int:
    """Where the last `lines` lines of the file start."""
    data = path.read_bytes()
    if lines <= 0:
        return len(data)
    return len(data) - sum(len(line) for line in data.splitlines(keepends=True)[-lines:])


class LogServer:
    def __init__(self, address: str, pki: Path, lookup: LogLookup) -> None:
        self.lookup = lookup
        handler = self._handler()
        self.httpd = ThreadingHTTPServer((address, 0), handler)
        self.httpd.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*self_signed(pki, address))
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="log server", daemon=True)

    def start(self) -> LogServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # quiet: the agent logs what matters
                return

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                parts = [unquote(p) for p in url.path.split("/") if p]
                if parts == ["healthz"]:
                    self._send(200, b"ok")
                    return
                if len(parts) != 4 or parts[0] != "containerLogs":
                    self._send(404, b"not found")
                    return
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                found = server.lookup(parts[1], parts[2], parts[3], query.get("previous") == "true")
                if found is None:
                    self._send(404, f"no log for container {parts[3]} of pod {parts[1]}/{parts[2]}".encode())
                    return
                self._stream(*found, query)

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _stream(self, path: Path, writing: Callable[[], bool], query: dict[str, str]) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()  # HTTP/1.0: the body ends when the connection closes
                offset = _tail_offset(path, int(query["tailLines"])) if "tailLines" in query else 0
                limit = int(query.get("limitBytes", 0)) or None
                sent = 0
                with path.open("rb") as log:
                    log.seek(offset)
                    while True:
                        chunk = log.read(65536)
                        if chunk:
                            if limit is not None:
                                chunk = chunk[: limit - sent]
                            self.wfile.write(chunk)
                            self.wfile.flush()
                            sent += len(chunk)
                            if limit is not None and sent >= limit:
                                return
                            continue
                        if query.get("follow") != "true" or not writing():
                            return
                        time.sleep(0.2)

        return Handler
