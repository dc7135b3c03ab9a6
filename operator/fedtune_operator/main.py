"""`fedtune-operator`: run the operator (kopf, standalone: one replica, no peering).

fedtune-operator --namespace team-a --namespace team-b   # only these namespaces
fedtune-operator --all-namespaces                         # cluster-wide
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

import kopf

from fedtune import logs, roles
from fedtune import metrics as fedtune_metrics


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
        help="kopf's liveness endpoint; empty to disable",
    )
    args = parser.parse_args(argv)
    if not args.namespace and not args.all_namespaces:
        env = [n for n in os.environ.get("FEDTUNE_WATCH_NAMESPACES", "").replace(",", " ").split() if n]
        if env:
            args.namespace = env
        else:
            parser.error("name the namespaces to watch (--namespace, FEDTUNE_WATCH_NAMESPACES) or --all-namespaces")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs.setup("operator", args.log_level, args.log_format)
    if args.log_level != "DEBUG":
        # kopf logs every event handler call ("Handler 'pod_changed' succeeded"): noise at INFO.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    from . import handlers  # noqa: F401  (registers the handlers, and through them the operator's metrics)

    fedtune_metrics.serve("operator", args.metrics_port)

    asyncio.run(
        kopf.operator(
            standalone=True,
            clusterwide=args.all_namespaces,
            namespaces=args.namespace,
            liveness_endpoint=args.liveness or None,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
