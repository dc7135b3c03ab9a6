"""Writing files and folders so that a crash never leaves one half-written: temporary name, then rename."""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def write_atomic(path: Path, data: bytes | str, *, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, value: Any) -> None:
    write_atomic(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


@contextmanager
def staged_dir(dest: Path, *, mode: int = 0o644) -> Iterator[Path]:
    """A temporary sibling folder to write `dest`'s files into; on success they are flushed, given
    `mode` (some writers make 0600 files) and it replaces `dest` whole (`replace_dir`); on failure
    it is removed and `dest` is left as it was."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    clear_leftovers(dest)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield staging
        for path in staging.iterdir():
            if path.is_file():
                os.chmod(path, mode)
        fsync_files(staging)
        replace_dir(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def clear_leftovers(dest: Path) -> None:
    """Remove what a writer of `dest` killed mid-way left beside it: the staging folder of a write that
    never finished, and the aside copy of a replaced `dest` — put back first when the kill fell between
    `replace_dir`'s two renames, so the last complete `dest` is never lost."""
    name = glob.escape(dest.name)
    for aside in dest.parent.glob(f".{name}.old-*"):
        if not dest.exists() and (aside / dest.name).exists():
            os.rename(aside / dest.name, dest)
        shutil.rmtree(aside, ignore_errors=True)
    for staging in dest.parent.glob(f".{name}.tmp-*"):
        shutil.rmtree(staging, ignore_errors=True)


def fsync_files(folder: Path) -> None:
    """Flush the files to disk before the rename publishes them (a crash must not expose empty files)."""
    for path in folder.iterdir():
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def replace_dir(new: Path, dest: Path) -> None:
    """Rename `new` to `dest`; an existing `dest` is moved aside first and deleted only afterwards."""
    os.chmod(new, 0o755)  # mkdtemp creates 0700
    if not dest.exists():
        os.rename(new, dest)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
    os.rename(dest, aside / dest.name)
    os.rename(new, dest)
    shutil.rmtree(aside, ignore_errors=True)


def dumps_schema(schema: list[tuple[str, tuple[int, ...]]]) -> str:
    """An adapter's tensor names and shapes, as parties compare them."""
    return json.dumps([[name, list(shape)] for name, shape in schema])
