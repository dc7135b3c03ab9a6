"""What every benchmark shares: the machine it ran on, the ChatGLM-6B adapter, background processes, kubectl."""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np

# ChatGLM-6B: 28 layers, LoRA r=8 on query_key_value (4096 -> 12288): A is 8x4096, B is 12288x8.
CHATGLM_LORA_LAYERS, HIDDEN, QKV, RANK = 28, 4096, 12288, 8


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.platform()}; {cpu}; {os.cpu_count()} cores; Python {platform.python_version()}"


def chatglm_lora_shapes() -> dict[str, tuple[int, ...]]:
    """ChatGLM-6B, LoRA r=8 on query_key_value: 28 layers x (A: 8x4096, B: 12288x8), 56 tensors."""
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(CHATGLM_LORA_LAYERS):
        prefix = f"base_model.model.transformer.layers.{layer}.attention.query_key_value"
        shapes[f"{prefix}.lora_A.weight"] = (RANK, HIDDEN)
        shapes[f"{prefix}.lora_B.weight"] = (QKV, RANK)
    return shapes


def chatglm_lora_adapter(seed: int = 0) -> dict[str, np.ndarray]:
    """An adapter shaped like ChatGLM-6B's LoRA r=8 on query_key_value: 3,670,016 weights."""
    rng = np.random.default_rng(seed)
    return {name: rng.normal(0, 0.02, shape).astype(np.float32) for name, shape in chatglm_lora_shapes().items()}


@contextlib.contextmanager
def process(argv: list[str], log: Path, env: dict[str, str] | None = None, *, cwd: Path | None = None,
            grace_s: float = 60) -> Iterator[subprocess.Popen[bytes]]:  # fmt: skip
    """A background process logging to `log` for the duration of the block (SIGTERM, then SIGKILL after `grace_s`)."""
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def kubectl(kubeconfig: Path, *args: str) -> str:
    """`kubectl --kubeconfig KUBECONFIG ARGS...`'s output; RuntimeError with its stderr if it fails."""
    result = subprocess.run(["kubectl", "--kubeconfig", str(kubeconfig), *args],
                            capture_output=True, text=True, check=False)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout
