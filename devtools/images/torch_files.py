"""Print the files of torch and of everything it requires, as installed in this Python.

The stand-in trainer base (standin-bases.sh) copies them into its image instead of
downloading the same few GB of wheels again: torch from the package index is the CUDA
build, and it does not import without its nvidia-* libraries. Paths are relative to
site-packages; pip and setuptools are left out (the image's venv has its own), and so
are files installed outside site-packages (console scripts).

    python devtools/images/torch_files.py   # first line: the torch version
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import PurePosixPath

LEFT_OUT = {"pip", "setuptools", "wheel"}


def closure(root: str) -> list[metadata.Distribution]:
    """`root` and the distributions it requires, recursively, extras included (torch
    requires the CUDA libraries through `cuda-toolkit[...]`)."""
    from packaging.requirements import Requirement

    wanted: dict[str, set[str]] = {}  # distribution -> the extras asked of it
    found: dict[str, metadata.Distribution] = {}
    todo = [Requirement(root)]
    while todo:
        requirement = todo.pop()
        name = requirement.name.lower().replace("_", "-")
        extras = wanted.setdefault(name, set())
        if name in LEFT_OUT or (name in found and requirement.extras <= extras):
            continue
        extras |= requirement.extras
        try:
            found[name] = dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional requirement this environment does not have
        for text in dist.requires or []:
            needed = Requirement(text)
            if needed.marker is None or any(needed.marker.evaluate({"extra": e}) for e in ("", *extras)):
                todo.append(needed)
    return list(found.values())


def main() -> int:
    print(metadata.version("torch"))
    for dist in closure("torch"):
        for file in dist.files or []:
            path = PurePosixPath(file)
            if ".." not in path.parts and "__pycache__" not in path.parts:
                print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
