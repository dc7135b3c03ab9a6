"""`python -m devtools.cluster up`: the whole local cluster (control plane + node), in the foreground.

    sudo python -m devtools.cluster up [--tag 0.1.0] [--dir DIR]
    sudo python -m devtools.cluster load [--tag 0.1.0]   # after `make images`, into the running node

`up` prints the kubeconfig and the folder holding every claim's data, then stays until
Ctrl-C or SIGTERM, which stop every pod and process. Needs root, the binaries of build.sh
and the images of `make images` (make dev-cluster does all three). `load` hands images
rebuilt since to the running node (only their changed layers move).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from devtools.cluster.devcluster import ControlPlaneError, _raise_system_exit, bin_dir
from devtools.cluster.node import DevCluster, load_into_running_node, project_images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start the control plane and the node, stay in the foreground")
    up.add_argument("--tag", default="0.1.0", help="tag of the project's images (make images)")
    up.add_argument("--dir", type=Path, help="work directory to use and keep (default: a temp dir)")
    load = commands.add_parser("load", help="load the project's images into the running node")
    load.add_argument("--tag", default="0.1.0", help="tag of the project's images (make images)")
    args = parser.parse_args(argv)
    if args.command == "load":
        try:
            load_into_running_node(project_images(args.tag))
        except ControlPlaneError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        return 0

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_system_exit)
    cluster = DevCluster(project_images(args.tag), args.dir)
    started = time.monotonic()
    try:
        cluster.start()
        assert cluster.node is not None
        print(f"cluster ready in {time.monotonic() - started:.0f}s at {cluster.plane.api_url}")
        print(f"claims:  {cluster.node.volumes}/<namespace>/<claim>/")
        print(f"logs:    {cluster.plane.log_dir}")
        print(f"export KUBECONFIG={cluster.plane.kubeconfig} PATH={bin_dir()}:$PATH", flush=True)
        while (failed := cluster.failed_component()) is None:
            time.sleep(1)
        print(f"{failed.name} exited ({failed.process.returncode}):\n{failed.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except ControlPlaneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()
        print("cluster stopped", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
