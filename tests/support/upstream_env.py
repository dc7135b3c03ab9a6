"""A virtual environment where ChatGLM-6B's own code runs: transformers 4.33, the version it was written for.

Made on demand and cached outside the clone (`$FEDTUNE_CACHE`, default `~/.cache/fedtune`), keyed by
what it installs. It installs transformers, tokenizers and their small dependencies from the package
index, each pinned and without its dependencies, so nothing else is resolved; torch (a few GB) is not
downloaded again: a `.pth` file puts a folder on the environment's path that holds links to this
interpreter's torch and the packages torch needs, and nothing else of this environment.

    python -m tests.support.upstream_env     # makes it (or says where it is)
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

PINNED = ("transformers==4.33.3", "tokenizers==0.13.3", "huggingface_hub==0.17.3", "safetensors==0.4.5",
          "sentencepiece==0.2.0", "regex==2024.9.11", "requests==2.32.3", "urllib3==2.2.3", "idna==3.10",
          "certifi==2024.8.30", "charset-normalizer==3.4.0", "pyyaml==6.0.2", "tqdm==4.66.5", "packaging==24.1",
          "peft==0.5.0", "accelerate==0.23.0", "psutil==6.0.0")
# What `import torch` needs, taken from this interpreter (numpy too: torch is built against this one).
SHARED = ("torch", "torchgen", "functorch", "nvidia", "cuda", "triton", "sympy", "mpmath", "networkx", "jinja2",
          "markupsafe", "fsspec", "filelock", "typing_extensions.py", "numpy", "numpy.libs", "setuptools")


def reference_folder() -> Path:
    """Upstream's ChatGLM-6B folder (the reference's demo folder): `../shared/reference/chatglm-6b-demo` beside
    the clone, or, in a git worktree, beside its main clone."""
    root = Path(__file__).resolve().parents[2]
    inside = Path("shared") / "reference" / "chatglm-6b-demo"
    common = subprocess.run(["git", "rev-parse", "--git-common-dir"], cwd=root, capture_output=True, text=True)
    clones = [root] + ([(root / common.stdout.strip()).resolve().parent] if common.returncode == 0 else [])
    return next((c.parent / inside for c in clones if (c.parent / inside).is_dir()), root.parent / inside)


def cache_root() -> Path:
    return Path(os.environ.get("FEDTUNE_CACHE") or Path.home() / ".cache" / "fedtune")


def site_packages() -> Path:
    spec = importlib.util.find_spec("torch")
    assert spec is not None and spec.submodule_search_locations, "torch is not installed here"
    return Path(next(iter(spec.submodule_search_locations))).parent


def location() -> Path:
    key = hashlib.sha256("\n".join((*PINNED, *SHARED, str(site_packages()), sys.version)).encode()).hexdigest()[:12]
    return cache_root() / f"chatglm6b-upstream-{key}"


def python() -> Path:
    """The environment's interpreter, made first if it is not there yet (a minute or two, once)."""
    home = location()
    if not (home / "ready").is_file():
        _build(home)
    return home / "venv" / "bin" / "python"


def _shared_paths() -> list[Path]:
    """The shared packages and their metadata (transformers checks the versions of what it needs)."""
    found = [site_packages() / name for name in SHARED if (site_packages() / name).exists()]
    names = {name.removesuffix(".py").replace("_", "-").lower() for name in SHARED}
    found += [info for info in site_packages().glob("*.dist-info")
              if info.name.split("-")[0].replace("_", "-").lower() in names]
    return found


def _build(home: Path) -> None:
    staging = home.with_name(f"{home.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", "--without-pip", str(staging / "venv")], check=True)
        shared = staging / "shared"
        shared.mkdir()
        for path in _shared_paths():
            (shared / path.name).symlink_to(path)
        own = next((staging / "venv" / "lib").glob("python*/site-packages"))
        (own / "fedtune_shared_torch.pth").write_text(f"{home / 'shared'}\n", encoding="utf-8")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "--no-deps", "--only-binary", ":all:", "--target", str(own), *PINNED], check=True)
        (staging / "ready").write_text("\n".join(PINNED) + "\n", encoding="utf-8")
        if home.exists():
            shutil.rmtree(home)
        staging.rename(home)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


if __name__ == "__main__":
    print(python())
