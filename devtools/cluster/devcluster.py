"""A real local Kubernetes control plane, envtest style.

Runs etcd, kube-apiserver and kube-controller-manager (and, for a cluster with a node,
kube-scheduler) built from source by ``build.sh`` (cached in
``${FEDTUNE_CACHE:-~/.cache/fedtune}/bin``). On its own there is no node: objects are
stored, validated, admitted, garbage-collected and namespaces finalise, but pods never
run. ``node.py`` adds a real node; ``python -m devtools.cluster up`` starts both.

Library use::

    with ControlPlane() as cp:
        subprocess.run(["kubectl", "--kubeconfig", str(cp.kubeconfig), "get", "ns"])

Command line::

    python devtools/cluster/devcluster.py up [--dir DIR]   # foreground, Ctrl-C stops
    python devtools/cluster/devcluster.py build

Only the standard library and ``cryptography`` (for the certificates).
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import ctypes
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build.sh"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
SERVICE_CIDR = "10.0.0.0/24"
# The first address of the service range is the in-cluster "kubernetes"
# Service; the serving certificate must name it for in-cluster clients.
KUBERNETES_SERVICE_IP = "10.0.0.1"
# Controllers that talk to a cloud provider; without one they only log errors.
CLOUD_CONTROLLERS = ("cloud-node-lifecycle-controller", "node-route-controller", "service-lb-controller")
PR_SET_PDEATHSIG = 1


class ControlPlaneError(RuntimeError):
    """The control plane could not be built, started or kept running."""


# --- locations and versions ---------------------------------------------------


def cache_dir() -> Path:
    """Where build.sh caches binaries and scratch modules (outside any clone)."""
    return Path(os.environ.get("FEDTUNE_CACHE") or Path.home() / ".cache" / "fedtune")


def bin_dir() -> Path:
    return cache_dir() / "bin"


def missing_binaries(directory: Path | None = None) -> list[str]:
    """Names of the control-plane binaries not (yet) built."""
    directory = directory or bin_dir()
    return [name for name in COMPONENTS if not os.access(directory / name, os.X_OK)]


def expected_versions() -> dict[str, str]:
    """The versions build.sh builds (honouring its env overrides): one source of truth."""
    out = subprocess.run(["bash", str(BUILD_SCRIPT), "versions"], check=True, capture_output=True, text=True).stdout
    return dict(line.split("=", 1) for line in out.split() if "=" in line)


def build() -> None:
    """Run build.sh; it skips every binary already present at the right version."""
    result = subprocess.run(["bash", str(BUILD_SCRIPT)], check=False)
    if result.returncode != 0:
        raise ControlPlaneError(f"{BUILD_SCRIPT} failed with exit code {result.returncode}")


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports nothing listens on right now (as envtest does).

    All sockets stay open until every port is chosen, so the kernel cannot
    hand out the same port twice.
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


# --- certificates -------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """File paths of the certificates and keys a control plane uses."""

    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    service_account_key: Path


def _pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    """Write a key readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _certificate(
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    extensions: Sequence[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        # A minute of back-dating absorbs small clock differences.
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=365))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def _key_usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_extensions(usage: x509.ObjectIdentifier) -> list[tuple[x509.ExtensionType, bool]]:
    return [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (_key_usage(ca=False), True),
        (x509.ExtendedKeyUsage([usage]), False),
    ]


def make_pki(directory: Path, address: str = "127.0.0.1") -> Pki:
    """A fresh CA, a serving cert for loopback and `address`, an admin client cert and a SA key."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki(
        *(
            directory / name
            for name in (
                "ca.crt",
                "ca.key",
                "serving.crt",
                "serving.key",
                "admin.crt",
                "admin.key",
                "sa.key",
            )
        )
    )
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtune-dev-ca")])
    ca_extensions = [(x509.BasicConstraints(ca=True, path_length=None), True), (_key_usage(ca=True), True)]
    ca = _certificate(ca_name, ca_key.public_key(), ca_name, ca_key, ca_extensions)
    pki.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_private(pki.ca_key, _pem_key(ca_key))

    # One serving certificate for kube-apiserver and kube-controller-manager:
    # both listen on 127.0.0.1 only.
    serving_key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [
        x509.DNSName(name)
        for name in (
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        )
    ]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in {"127.0.0.1", address, KUBERNETES_SERVICE_IP}]
    serving = _certificate(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]),
        serving_key.public_key(),
        ca_name,
        ca_key,
        [*_leaf_extensions(ExtendedKeyUsageOID.SERVER_AUTH), (x509.SubjectAlternativeName(names), False)],
    )
    pki.serving_cert.write_bytes(serving.public_bytes(serialization.Encoding.PEM))
    _write_private(pki.serving_key, _pem_key(serving_key))

    # system:masters is the group RBAC never restricts: the envtest admin.
    admin_key = ec.generate_private_key(ec.SECP256R1())
    admin = _certificate(
        x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
                x509.NameAttribute(NameOID.COMMON_NAME, "fedtune-admin"),
            ]
        ),
        admin_key.public_key(),
        ca_name,
        ca_key,
        _leaf_extensions(ExtendedKeyUsageOID.CLIENT_AUTH),
    )
    pki.admin_cert.write_bytes(admin.public_bytes(serialization.Encoding.PEM))
    _write_private(pki.admin_key, _pem_key(admin_key))

    # RSA because RS256 is what every token consumer accepts.
    _write_private(pki.service_account_key, _pem_key(rsa.generate_private_key(65537, 2048)))
    return pki


def write_kubeconfig(path: Path, server: str, pki: Pki) -> None:
    """An admin kubeconfig with CA, certificate and key embedded (no file refs)."""

    def b64(file: Path) -> str:
        return base64.b64encode(file.read_bytes()).decode()

    path.write_text(
        "apiVersion: v1\n"
        "kind: Config\n"
        "clusters:\n"
        "- name: fedtune-dev\n"
        "  cluster:\n"
        f"    server: {server}\n"
        f"    certificate-authority-data: {b64(pki.ca_cert)}\n"
        "users:\n"
        "- name: fedtune-admin\n"
        "  user:\n"
        f"    client-certificate-data: {b64(pki.admin_cert)}\n"
        f"    client-key-data: {b64(pki.admin_key)}\n"
        "contexts:\n"
        "- name: fedtune-dev\n"
        "  context:\n"
        "    cluster: fedtune-dev\n"
        "    user: fedtune-admin\n"
        "current-context: fedtune-dev\n"
    )
    path.chmod(0o600)


# --- processes ----------------------------------------------------------------


def _child_setup() -> None:
    """Runs in the child before exec: own process group, die with the parent.

    The process group lets stop() signal everything a component spawned; the
    parent-death signal makes the kernel end the component even if the Python
    parent is killed with SIGKILL and no cleanup code runs. (The signal fires
    when the *thread* that started the child exits: start from a long-lived
    thread, as the CLI and pytest do.)
    """
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Component:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, grace: float) -> None:
        """SIGTERM the component's process group, SIGKILL it after `grace` seconds."""
        if self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(wait)
                return


def _spawn(name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None) -> Component:
    log = log_dir / f"{name}.log"
    with log.open("ab") as handle:
        process = subprocess.Popen(
            argv,
            env=None if env is None else {**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            preexec_fn=_child_setup,
            close_fds=True,
        )
    return Component(name, process, log)


def _probe(url: str, context: ssl.SSLContext | None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            body = response.read().decode(errors="replace")
    except (urllib.error.URLError, OSError, ValueError):
        return False
    # etcd answers {"health":"true",...}; the Kubernetes servers answer "ok".
    return response.status == 200 and (body.strip() == "ok" or '"health":"true"' in body)


def _wait_healthy(component: Component, check: Callable[[], bool], deadline: float) -> None:
    """Poll until `check` passes; fail early, with its log, if the process dies."""
    while True:
        if component.process.poll() is not None:
            raise ControlPlaneError(
                f"{component.name} exited with code {component.process.returncode}; "
                f"last lines of {component.log}:\n{component.log_tail()}"
            )
        if check():
            return
        if time.monotonic() > deadline:
            raise ControlPlaneError(
                f"{component.name} not healthy in time; last lines of {component.log}:\n{component.log_tail()}"
            )
        time.sleep(0.25)


# --- the control plane --------------------------------------------------------

TEMP_PREFIX = "fedtune-cluster-"
OWNER_FILE = "owner.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_workdirs() -> None:
    """Remove temp workdirs whose owning Python process has died.

    A parent killed with SIGKILL takes its components with it (parent-death
    signal) but cannot remove its directory; the next start does.
    """
    for workdir in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*"):
        try:
            owner = int((workdir / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not ours, or still being created
        if not _alive(owner):
            shutil.rmtree(workdir, ignore_errors=True)


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager (+ kube-scheduler) on 127.0.0.1.

    `workdir=None` uses a fresh temporary directory that stop() removes; a
    given `workdir` is kept after stop() so its logs can be read. With a node
    (devtools/cluster/node.py) the API server listens on the node's bridge
    `address` instead, where pods reach it as the `kubernetes` Service, and
    `scheduler=True` adds kube-scheduler.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        binaries: Path | None = None,
        start_timeout: float = 180.0,
        stop_grace: float = 10.0,
        address: str = "127.0.0.1",
        scheduler: bool = False,
    ) -> None:
        self.binaries = binaries or bin_dir()
        self.address = address
        self.scheduler = scheduler
        self.start_timeout = start_timeout
        self.stop_grace = stop_grace
        self._given_workdir = workdir
        self._workdir: Path | None = None
        self._components: list[Component] = []
        self.api_url = ""
        self.etcd_url = ""

    # Paths are only meaningful once started, so they are properties that say so.
    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            raise ControlPlaneError("control plane not started")
        return self._workdir

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def pki(self) -> Pki:
        return self._pki

    def start(self) -> ControlPlane:
        """Start all components and return once each reports healthy."""
        if self._components:
            raise ControlPlaneError("control plane already started")
        missing = missing_binaries(self.binaries)
        if missing:
            raise ControlPlaneError(f"missing {', '.join(missing)} in {self.binaries}; run {BUILD_SCRIPT}")
        self._workdir = self._make_workdir()
        # A forgotten stop() still runs at interpreter exit (the kernel's
        # parent-death signal covers the case where Python itself is killed).
        atexit.register(self.stop)
        try:
            self._start_all(time.monotonic() + self.start_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every component (newest first) and remove a temporary workdir."""
        try:
            for component in reversed(self._components):
                component.stop(self.stop_grace)
        finally:
            atexit.unregister(self.stop)
            self._components.clear()
            if self._workdir is not None and self._given_workdir is None:
                shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def failed_component(self) -> Component | None:
        """The first component that has exited, if any (for foreground supervision)."""
        return next((c for c in self._components if c.process.poll() is not None), None)

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals --

    def _make_workdir(self) -> Path:
        if self._given_workdir is None:
            remove_stale_workdirs()
            workdir = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
            # Lets a later run tell that this directory's owner is gone.
            (workdir / OWNER_FILE).write_text(str(os.getpid()))
            return workdir
        self._given_workdir.mkdir(parents=True, exist_ok=True)
        return self._given_workdir.resolve()

    def _start_all(self, deadline: float) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        pki = self._pki = make_pki(self.workdir / "pki", self.address)
        tls = ssl.create_default_context(cafile=str(pki.ca_cert))
        tls.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))

        etcd_client, etcd_peer, secure_port, kcm_port, scheduler_port = free_ports(5)

        self.etcd_url = f"http://127.0.0.1:{etcd_client}"
        etcd = self._launch("etcd", self._etcd_args(f"http://127.0.0.1:{etcd_peer}"))
        _wait_healthy(etcd, lambda: _probe(f"{self.etcd_url}/health", None), deadline)

        self.api_url = f"https://{self.address}:{secure_port}"
        write_kubeconfig(self.kubeconfig, self.api_url, pki)
        apiserver = self._launch("kube-apiserver", self._apiserver_args(pki, secure_port))
        _wait_healthy(apiserver, lambda: _probe(f"{self.api_url}/healthz", tls), deadline)

        kcm = self._launch("kube-controller-manager", self._controller_manager_args(pki, kcm_port))
        _wait_healthy(kcm, lambda: _probe(f"https://127.0.0.1:{kcm_port}/healthz", tls), deadline)

        if self.scheduler:
            scheduler = self._launch("kube-scheduler", self._scheduler_args(scheduler_port))
            _wait_healthy(scheduler, lambda: _probe(f"https://127.0.0.1:{scheduler_port}/healthz", tls), deadline)

    def _launch(self, name: str, args: list[str]) -> Component:
        component = _spawn(name, [str(self.binaries / name), *args], self.log_dir)
        self._components.append(component)
        return component

    def _etcd_args(self, peer: str) -> list[str]:
        client = self.etcd_url
        return [
            "--name=fedtune",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=fedtune={peer}",
            # Throw-away data: fsync only costs time here.
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]

    def _apiserver_args(self, pki: Pki, port: int) -> list[str]:
        cert_dir = self.workdir / "apiserver-certs"
        cert_dir.mkdir(exist_ok=True)
        return [
            f"--etcd-servers={self.etcd_url}",
            f"--cert-dir={cert_dir}",
            f"--tls-cert-file={pki.serving_cert}",
            f"--tls-private-key-file={pki.serving_key}",
            f"--secure-port={port}",
            f"--bind-address={self.address}",
            # Without it the apiserver looks for a default route and may refuse to start.
            f"--advertise-address={self.address}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=RBAC",
            f"--client-ca-file={pki.ca_cert}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            # One private key serves to sign and (its public half) to verify tokens.
            f"--service-account-key-file={pki.service_account_key}",
            f"--service-account-signing-key-file={pki.service_account_key}",
            "--allow-privileged=true",
            # kubectl logs/exec: the API server calls the kubelet as the admin.
            f"--kubelet-client-certificate={pki.admin_cert}",
            f"--kubelet-client-key={pki.admin_key}",
            "--kubelet-preferred-address-types=InternalIP",
            # On loopback, the default reconciler would publish 127.0.0.1 as the endpoint
            # of the in-cluster "kubernetes" Service, which validation rejects (loopback)
            # every 10s; without a node no pod uses that Service anyway.
            *(["--endpoint-reconciler-type=none"] if self.address == "127.0.0.1" else []),
        ]

    def _controller_manager_args(self, pki: Pki, port: int) -> list[str]:
        disabled = ",".join(f"-{name}" for name in CLOUD_CONTROLLERS)
        return [
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--leader-elect=false",
            f"--controllers=*,{disabled}",
            f"--service-account-private-key-file={pki.service_account_key}",
            f"--root-ca-file={pki.ca_cert}",
            f"--cluster-signing-cert-file={pki.ca_cert}",
            f"--cluster-signing-key-file={pki.ca_key}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--tls-cert-file={pki.serving_cert}",
            f"--tls-private-key-file={pki.serving_key}",
        ]


    def _scheduler_args(self, port: int) -> list[str]:
        return [
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--tls-cert-file={self.pki.serving_cert}",
            f"--tls-private-key-file={self.pki.serving_key}",
        ]


# --- command line -------------------------------------------------------------


def _raise_system_exit(signum: int, _frame: object) -> None:
    # Turning SIGTERM/SIGHUP into an exception makes the `finally` below run.
    raise SystemExit(128 + signum)


def _up(workdir: Path | None) -> int:
    if missing_binaries():
        build()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_system_exit)
    plane = ControlPlane(workdir)
    started = time.monotonic()
    try:
        plane.start()
        print(f"control plane ready in {time.monotonic() - started:.1f}s at {plane.api_url}")
        print(f"kubeconfig: {plane.kubeconfig}")
        print(f"logs:       {plane.log_dir}")
        print(f"export KUBECONFIG={plane.kubeconfig}", flush=True)
        return _supervise(plane)
    except KeyboardInterrupt:
        return 0
    finally:
        plane.stop()
        print("control plane stopped", file=sys.stderr)


def _supervise(plane: ControlPlane) -> int:
    """Stay in the foreground; exit non-zero if a component dies on its own."""
    while True:
        failed = plane.failed_component()
        if failed is not None:
            print(
                f"{failed.name} exited ({failed.process.returncode}):\n{failed.log_tail()}",
                file=sys.stderr,
            )
            return 1
        time.sleep(1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="build if needed, start, stay in the foreground")
    up.add_argument("--dir", type=Path, help="work directory to use and keep (default: a temp dir)")
    commands.add_parser("build", help="build the binaries into the cache only")
    commands.add_parser("versions", help="print the versions build.sh builds, as JSON")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            build()
            return 0
        if args.command == "versions":
            print(json.dumps(expected_versions()))
            return 0
        return _up(args.dir)
    except ControlPlaneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
