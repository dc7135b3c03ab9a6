"""Capture kube-apiserver's schemas of the pod-scheduling types into the operator's kubeschema.json.

    python -m devtools.cluster.openapi            # start a control plane, capture, write
    python -m devtools.cluster.openapi --check    # exit 1 when the committed capture differs

Run it after changing the Kubernetes version build.sh builds, then regenerate the CRD
(`python -m fedtune_operator.crdgen --write`). What is kept, and why: `fedtune_operator.kubeschema`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from devtools.cluster import devcluster
from fedtune_operator import kubeschema

PATH = "/openapi/v3/api/v1"


def fetch(kubeconfig: Path) -> str:
    """The capture as kube-apiserver at `kubeconfig` serves it, rendered as kubeschema.json is."""
    import kubernetes

    from fedtune_operator.kube import Kube

    kube = Kube(kubernetes.config.new_client_from_config(str(kubeconfig)))
    source = f"kube-apiserver {kube.request('GET', '/version')['gitVersion']} {PATH}"
    return kubeschema.render_capture(kubeschema.capture(kube.request("GET", PATH)), source)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the committed capture is stale")
    args = parser.parse_args(argv)
    with devcluster.ControlPlane() as plane:
        text = fetch(plane.kubeconfig)
    if args.check:
        if kubeschema.CAPTURE.read_text(encoding="utf-8") != text:
            print(f"{kubeschema.CAPTURE.name} is stale: run `python -m devtools.cluster.openapi`")
            return 1
        return 0
    kubeschema.CAPTURE.write_text(text, encoding="utf-8")
    print(f"wrote {kubeschema.CAPTURE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
