"""`fedtune-operator`: run the operator (kopf, standalone: no kopf peering).

fedtune-operator --namespace team-a --namespace team-b   # only these namespaces
fedtune-operator --all-namespaces                         # cluster-wide
fedtune-operator -A --leader-elect --lease-namespace ops  # one of several replicas (`leader.py`)

With --leader-elect a replica waits, answering its liveness probe, until it holds the Lease;
then it reconciles until it loses it, and exits (status 1) so that it comes back as a standby.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import kopf

from fedtune import logs, roles
from fedtune.federation import metrics as fedtune_metrics

from . import podpolicy

EXIT_LOST_LEASE = 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedtune-operator", description="The fedtune Kubernetes operator.")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("FEDTUNE_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
    )
    parser.add_argument(
        "--log-format", default=os.environ.get(logs.FORMAT_ENV, "text"), choices=logs.FORMATS,
        help="text lines, or one JSON object per line",
    )
    parser.add_argument(
        "--metrics-port", type=int, default=int(os.environ.get(roles.METRICS_PORT_ENV) or 0),
        help="serve Prometheus metrics on this port (/metrics); 0: none",
    )
    parser.add_argument(
        "--liveness",
        default=os.environ.get("FEDTUNE_LIVENESS", "http://0.0.0.0:8080/healthz"),
        help="kopf's liveness endpoint (a standby answers it too); empty to disable",
    )
    election = parser.add_argument_group("leader election (several replicas, one reconciling)")
    election.add_argument("--leader-elect", action="store_true", help="reconcile only while holding the Lease")
    election.add_argument("--lease-name", default="fedtune-operator")
    election.add_argument("--lease-namespace", default=os.environ.get("FEDTUNE_OPERATOR_NAMESPACE") or "default")
    election.add_argument("--lease-duration", type=float, default=15.0,
                          help="seconds without renewal after which a standby takes the Lease")
    election.add_argument("--identity", default=os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}",
                          help="this replica's name in the Lease (default: the pod's name)")
    args = parser.parse_args(argv)
    try:  # the chart's podTemplate.allow, read by the reconciler: a misspelt name fails the start, not a job
        podpolicy.allowed_from_env(os.environ)
    except ValueError as err:
        parser.error(str(err))
    if not args.namespace and not args.all_namespaces:
        env = [n for n in os.environ.get("FEDTUNE_WATCH_NAMESPACES", "").replace(",", " ").split() if n]
        if env:
            args.namespace = env
        else:
            parser.error("name the namespaces to watch (--namespace, FEDTUNE_WATCH_NAMESPACES) or --all-namespaces")
    return args


def _run_kopf(args: argparse.Namespace, stop: threading.Event | None = None) -> None:
    asyncio.run(
        kopf.operator(
            standalone=True,
            clusterwide=args.all_namespaces,
            namespaces=args.namespace,
            liveness_endpoint=args.liveness or None,
            stop_flag=stop,
        )
    )


def _standby_health(liveness: str) -> ThreadingHTTPServer | None:
    """A standby's answer on the liveness endpoint (kopf serves it once this replica leads)."""
    if not liveness:
        return None
    url = urllib.parse.urlsplit(liveness)

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            found = self.path == (url.path or "/")
            self.send_response(200 if found else 404)
            self.end_headers()
            self.wfile.write(b"standby\n" if found else b"")

        def log_message(self, *_: object) -> None:  # probes every few seconds: no log line each
            pass

    server = ThreadingHTTPServer((url.hostname or "0.0.0.0", url.port or 80), Health)
    threading.Thread(target=server.serve_forever, name="fedtune-standby-health", daemon=True).start()
    return server


def _lead_then_run(args: argparse.Namespace) -> int:
    from .kube import Kube, api_client
    from .leader import LeaseElector

    renew_s = max(1.0, args.lease_duration / 3)
    # Calls time out before a renewal is due: a hung call must not outlive the lease.
    elector = LeaseElector(Kube(api_client(), timeout_s=renew_s), args.lease_namespace, args.lease_name,
                           args.identity, duration_s=args.lease_duration, renew_s=renew_s)
    never = threading.Event()
    health = _standby_health(args.liveness)
    try:
        elector.acquire(never)
    finally:
        if health is not None:
            health.shutdown()
            health.server_close()
    lost, done = threading.Event(), threading.Event()
    elector.keep(lost.set, done)
    try:
        _run_kopf(args, stop=lost)
    finally:
        done.set()
    if lost.is_set():
        return EXIT_LOST_LEASE
    elector.release()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs.setup("operator", args.log_level, args.log_format)
    if args.log_level != "DEBUG":
        # kopf logs every event handler call ("Handler 'pod_changed' succeeded"): noise at INFO.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    from . import handlers  # noqa: F401  (registers the handlers, and through them the operator's metrics)

    fedtune_metrics.serve("operator", args.metrics_port)
    if args.leader_elect:
        return _lead_then_run(args)
    _run_kopf(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
