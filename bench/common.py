"""What every benchmark shares: the machine it ran on, and robust timing."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

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


def chatglm_lora_adapter(seed: int = 0) -> dict[str, np.ndarray]:
    """An adapter shaped like ChatGLM-6B's LoRA r=8 on query_key_value: 3,670,016 weights."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(CHATGLM_LORA_LAYERS):
        prefix = f"base_model.model.transformer.layers.{layer}.attention.query_key_value"
        tensors[f"{prefix}.lora_A.weight"] = rng.normal(0, 0.02, (RANK, HIDDEN)).astype(np.float32)
        tensors[f"{prefix}.lora_B.weight"] = rng.normal(0, 0.02, (QKV, RANK)).astype(np.float32)
    return tensors


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
