"""Inside a container's namespaces: build its root filesystem, then exec its command.

The node agent runs, per container,

    nsenter --net=/run/netns/<pod> -- unshare --mount --uts --ipc --propagation private -- \
        python podinit.py <container>.json

so this script starts in the pod's network namespace and a fresh, private mount
namespace (nothing it mounts is seen by the host, and it all vanishes with the last
process). It then does what a container runtime does, with the host's files as the image:

- the root is an overlay whose lower layer is the host's `/` and whose upper layer is
  a tmpfs: the container sees every host binary (`fedtune`, `redis-server`, Python)
  but whatever it writes outside its volumes is private to it and thrown away (and a
  read-only root is a read-only overlay);
- the host's other mounts (`/proc`, `/sys`, ...) are bound in again, and `/dev` is a
  fresh tmpfs with the usual device nodes bound from the host, `/dev/shm` its own;
- volumes are bind mounts from the host folders the agent prepared, in path order, so
  a mount path the host lacks (`/etc/fedtune`) is made in the overlay, never on the host;
- `/etc/hosts`, `/etc/resolv.conf` and `/etc/hostname` are the pod's own files.

Only the standard library: it runs with whatever Python runs the agent, before any
pod-specific environment exists. Any failure before exec is written to the start-error
file the agent reads, and the exit status is 128 (a kubelet's StartError).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

START_ERROR_EXIT = 128
# Device nodes every container gets (as runc gives them).
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
    "ptmx": "pts/ptmx",
}


class SetupError(Exception):
    pass


def mount(*args: str) -> None:
    result = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SetupError(f"mount {' '.join(args)}: {result.stderr.strip()}")


def host_submounts() -> list[str]:
    """Mount points directly under the host's root mount, in mount order (`/proc`, `/sys`, ...)."""
    entries = [line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    root_ids = [fields[0] for fields in entries if fields[4] == "/"]
    if not root_ids:
        return []
    root = root_ids[-1]
    points = []
    for fields in entries:
        point = fields[4].encode().decode("unicode_escape")  # mountinfo escapes spaces as \040
        if fields[1] == root and point != "/" and point not in points:
            points.append(point)
    return points


def in_root(root: Path, path: str, depth: int = 0) -> Path:
    """`path` inside `root` with symlinks resolved as the container will see them.

    `/var/run` is a symlink to `/run`: joined naively, a mount at
    `/var/run/secrets/...` would follow it out of the root onto the host's `/run`.
    """
    if depth > 40:
        raise SetupError(f"too many symlinks in {path}")
    current = root
    parts = [p for p in path.split("/") if p not in ("", ".")]
    for index, part in enumerate(parts):
        if part == "..":
            current = current.parent if current != root else root
            continue
        candidate = current / part
        if candidate.is_symlink():
            target = os.readlink(candidate)
            rest = "/".join(parts[index + 1 :])
            base = "" if target.startswith("/") else str(current.relative_to(root))
            return in_root(root, f"{base}/{target}/{rest}", depth + 1)
        current = candidate
    return current


def ensure(path: Path, is_file: bool) -> None:
    """Make a mount point; inside the overlay this never reaches the host."""
    if is_file:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.touch()
    else:
        path.mkdir(parents=True, exist_ok=True)


def bind(source: str, target: Path, read_only: bool, is_file: bool) -> None:
    ensure(target, is_file)
    mount("--rbind", source, str(target))
    if read_only:
        mount("-o", "remount,bind,ro", str(target))


def make_root(scratch: Path) -> Path:
    """A tmpfs holding the overlay's upper layer, and the overlay of `/` on top of it."""
    mount("-t", "tmpfs", "-o", "mode=755", "fedtune-pod", str(scratch))
    for name in ("upper", "work", "root"):
        (scratch / name).mkdir()
    root = scratch / "root"
    options = f"lowerdir=/,upperdir={scratch / 'upper'},workdir={scratch / 'work'}"
    mount("-t", "overlay", "-o", options, "fedtune-root", str(root))
    return root


def bind_host_mounts(root: Path, skip: set[str]) -> None:
    for point in host_submounts():
        if point == "/dev" or point.startswith("/dev/") or point in skip:
            continue
        if not Path(point).is_dir():
            continue  # a file bind of the host's; the overlay shows the file underneath
        mount("--rbind", point, str(root / point.lstrip("/")))


def make_dev(root: Path, devices: list[str]) -> None:
    dev = root / "dev"
    mount("-t", "tmpfs", "-o", "mode=755,nosuid", "fedtune-dev", str(dev))
    for name in [*DEVICES, *devices]:
        if os.path.exists(f"/dev/{name}"):
            bind(f"/dev/{name}", dev / name, read_only=False, is_file=True)
    for name, target in DEV_LINKS.items():
        os.symlink(target, dev / name)
    (dev / "pts").mkdir()
    mount("--rbind", "/dev/pts", str(dev / "pts"))
    (dev / "shm").mkdir()
    mount("-t", "tmpfs", "-o", "mode=1777,nosuid,nodev,size=512m", "fedtune-shm", str(dev / "shm"))


def _under(path: str, folder: str) -> bool:
    folder = folder.rstrip("/") or "/"
    return path == folder or path.startswith(folder + "/") or folder == "/"


def keep_image_visible(root: Path, mounts: list[dict], image_paths: list[str]) -> None:
    """Bind host folders the "image" needs back over any volume that hides them.

    The host is every container's image, and a project installed from, say, a clone in
    /tmp (a CI checkout) lives in a folder that a pod's /tmp emptyDir would hide: the
    container could no longer import its own program. A real image never keeps its code
    under a volume's mount path, so re-exposing those folders (read-only) is what the
    image would look like. A volume mounted exactly at such a folder is left alone.
    """
    targets = [m["target"] for m in mounts if not m.get("file")]
    for path in image_paths:
        covering = [t for t in targets if _under(path, t)]
        if not covering or path in (t.rstrip("/") for t in covering) or not Path(path).is_dir():
            continue
        try:
            bind(path, in_root(root, path), read_only=True, is_file=False)
        except (SetupError, OSError) as err:  # e.g. a read-only volume: the mount point cannot be made
            print(f"fedtune node agent: {path} stays hidden by a volume: {err}", file=sys.stderr)


def setup(config: dict) -> None:
    socket.sethostname(config["hostname"])
    scratch = Path(config["scratch"])
    root = make_root(scratch)
    bind_host_mounts(root, skip={str(scratch)})
    make_dev(root, config.get("devices", []))
    # Parents before children: /workspace before /workspace/models.
    for m in sorted(config["mounts"], key=lambda m: m["target"].rstrip("/").count("/")):
        bind(m["source"], in_root(root, m["target"]), m.get("readOnly", False), m.get("file", False))
    keep_image_visible(root, config["mounts"], config.get("imagePaths", []))
    workdir = config.get("workingDir") or "/"
    in_root(root, workdir).mkdir(parents=True, exist_ok=True)
    if config.get("readOnlyRootFilesystem"):
        mount("-o", "remount,ro", str(root))
    os.chroot(root)
    os.chdir(workdir)


def main(argv: list[str]) -> int:
    config = json.loads(Path(argv[1]).read_text())
    # Opened before chroot: after it, the host's path is out of reach.
    errors = open(config["startError"], "w", encoding="utf-8")  # noqa: SIM115 (kept open until exec)
    os.set_inheritable(errors.fileno(), False)
    try:
        setup(config)
        os.execvpe(config["argv"][0], config["argv"], config["env"])
    except (SetupError, OSError) as err:
        errors.write(str(err))
        errors.flush()
        print(f"fedtune node agent: cannot start container: {err}", file=sys.stderr)
        return START_ERROR_EXIT
    return START_ERROR_EXIT  # not reached: exec replaced the process


if __name__ == "__main__":
    sys.exit(main(sys.argv))
