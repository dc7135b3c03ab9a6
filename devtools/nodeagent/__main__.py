"""`python -m devtools.nodeagent`: run the node agent, clean up after one, or a whole dev cluster.

    python -m devtools.nodeagent run --kubeconfig K --data-dir D   # a node for an existing control plane
    python -m devtools.nodeagent cleanup                           # what a killed agent left on the host
    python -m devtools.nodeagent dev-cluster [--dir DIR]           # control plane + node, foreground

Needs root, iproute2 (`ip`) and util-linux (`nsenter`, `unshare`, `mount`).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from ..cluster import devcluster
from .agent import DEFAULT_ENTRYPOINTS, Agent, AgentConfig
from .network import Network

TOOLS = ("ip", "nsenter", "unshare", "mount")


def missing_prerequisites() -> list[str]:
    problems = [f"`{tool}` not on PATH" for tool in TOOLS if shutil.which(tool) is None]
    if os.geteuid() != 0:
        problems.append("not running as root (network and mount namespaces need it)")
    return problems


def _parse_entrypoint(text: str) -> tuple[str, list[str]]:
    image, sep, command = text.partition("=")
    if not sep or not image or not command.strip():
        raise argparse.ArgumentTypeError(f"--entrypoint {text}: want IMAGE=COMMAND")
    return image, command.split()


def _agent_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--node-name", default="fedtune-node")
    parser.add_argument("--pod-cidr", default="10.200.0.0/24", help="addresses for pods (the first is the host's)")
    parser.add_argument("--prefix", default="fta", help="name prefix of every netns and link the agent makes")
    parser.add_argument("--gpus", type=int, default=0, help="nvidia.com/gpu the node advertises")
    parser.add_argument("--namespace", action="append", default=[], help="only run pods of this namespace")
    parser.add_argument("--restart-backoff", type=float, default=10.0, help="first restart delay, seconds")
    parser.add_argument(
        "--entrypoint",
        action="append",
        default=[],
        type=_parse_entrypoint,
        help="IMAGE=COMMAND for containers that give only args (repeatable)",
    )
    parser.add_argument("--keep-node", action="store_true", help="leave the Node object when stopping")
    parser.add_argument("--log-level", default="INFO")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m devtools.nodeagent", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a node against a control plane")
    env_config = os.environ.get("KUBECONFIG")
    run.add_argument("--kubeconfig", type=Path, default=env_config, required=env_config is None)
    run.add_argument("--data-dir", type=Path, required=True, help="volumes (claims) and pod folders live here")
    _agent_args(run)
    cleanup = commands.add_parser("cleanup", help="remove the namespaces, links and processes of a killed agent")
    cleanup.add_argument("--prefix", default="fta")
    dev = commands.add_parser("dev-cluster", help="control plane (devtools/cluster) and a node, in the foreground")
    dev.add_argument("--dir", type=Path, help="keep certificates, logs, etcd and volumes here (default: a temp dir)")
    _agent_args(dev)
    return parser


def agent_config(args: argparse.Namespace, kubeconfig: Path, data_dir: Path) -> AgentConfig:
    entrypoints = dict(DEFAULT_ENTRYPOINTS)
    entrypoints.update(dict(args.entrypoint))
    return AgentConfig(
        kubeconfig=kubeconfig,
        data_dir=data_dir,
        node_name=args.node_name,
        pod_cidr=args.pod_cidr,
        prefix=args.prefix,
        gpus=args.gpus,
        namespaces=tuple(args.namespace),
        restart_backoff_s=args.restart_backoff,
        entrypoints=entrypoints,
        delete_node_on_exit=not args.keep_node,
    )


def _stop_on_signals(agent: Agent) -> None:
    def handler(signum: int, _frame: FrameType | None) -> None:
        logging.getLogger("nodeagent").info("signal %d: stopping", signum)
        agent.stop_event.set()
        agent.wake()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, handler)


def run_agent(config: AgentConfig, ready_message: str = "") -> int:
    agent = Agent(config)
    _stop_on_signals(agent)
    try:
        agent.start()
    except BaseException:
        agent.shutdown()
        raise
    print(ready_message or f"node {config.node_name} ready", flush=True)
    agent.run()  # in the main thread: containers die with the thread that started them
    return 0


def dev_cluster(args: argparse.Namespace) -> int:
    if devcluster.missing_binaries():
        devcluster.build()
    base = args.dir.resolve() if args.dir else Path(tempfile.mkdtemp(prefix="fedtune-dev-cluster-"))
    plane = devcluster.ControlPlane(base / "control-plane")
    plane.start()
    try:
        data = base / "node"
        message = "\n".join(
            [
                f"control plane at {plane.api_url}, node {args.node_name} (pods on {args.pod_cidr})",
                f"kubeconfig: {plane.kubeconfig}",
                f"volumes:    {data / 'volumes'}  (a claim is <volumes>/<namespace>/<claim>/)",
                f"logs:       {plane.log_dir}",
                f"export KUBECONFIG={plane.kubeconfig}",
            ]
        )
        return run_agent(agent_config(args, plane.kubeconfig, data), message)
    finally:
        plane.stop()
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    problems = missing_prerequisites()
    if problems:
        print("node agent cannot run: " + "; ".join(problems), file=sys.stderr)
        print("install them with: apt-get install -y iproute2 util-linux mount", file=sys.stderr)
        return 2
    if args.command == "cleanup":
        Network(ipaddress.ip_network("10.200.0.0/24"), args.prefix).cleanup()
        return 0
    if args.command == "run":
        return run_agent(agent_config(args, args.kubeconfig, args.data_dir))
    assert threading.current_thread() is threading.main_thread()
    return dev_cluster(args)


if __name__ == "__main__":
    sys.exit(main())
