"""How `fedtune run` grows with the parties: 2 to 64 label_trainers, under plain, otp and secagg_plus.

The workload is the demo's (the tiny GLM that `make demo` builds, LoRA as in
examples/lora-3party.yaml, one epoch, agg_steps 0.2: 5 rounds) with N label_trainers, each on a
bundled poems part (node-i on part i mod 3), beside the assist_trainer on part 0. The work grows
with the training parties, N + 1.

For each scheme and N it runs the job --runs times and prints medians of

- wall: `fedtune run`'s own wall time; cpu: CPU-seconds of it and every process under it;
- pss: the job's peak proportional set size (summary.json), and per label_trainer: its growth over
  the smallest N run, divided by the label_trainers added;
- start: from the launcher's start to the last party's first optimizer step;
- round: the training span (first step to last) over the rounds; combine: the aggregator's time
  to combine one round (from its log);
- the ratio of wall to the 8-label_trainer run's, against the work's ratio (goal: at most 1.2x it).

A run that fails is counted and reported (secagg_plus's goal: none in 10 runs at 8 and 32).

`--combine` times the aggregator's combine alone, where training does not compete for the CPU:
the submission that closes a round (it stores the update and combines them all, through a real
redis-server) for 8 to 64 updates of 262,144 weights, plain and otp, best of 5; per update it
stays flat when the combine is linear in the parties.

    python bench/parties.py                                  # 2..64 x plain, otp, secagg_plus, 1 run each
    python bench/parties.py --parties 2,4,8 --schemes plain  # what fits a small machine
    python bench/parties.py --parties 8,32 --schemes secagg_plus --runs 10
    python bench/parties.py --combine
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "lora-3party.yaml"
POEMS = REPO / "examples" / "data" / "poems"
ENCRYPTIONS = {
    "plain": {"plain": {}},
    "otp": {"otp": {"key_bitlength": 64, "key_exchange": {"curve": "x25519"}, "csprng": {"name": "chacha20"}}},
    "secagg_plus": {"secagg_plus": {"key_bitlength": 64, "key_exchange": {"curve": "x25519"},
                                    "csprng": {"name": "chacha20"}}},
}
COMBINED = re.compile(r"round \d+ aggregated from .* in ([0-9.]+) s")
GROWTH_GOAL = 1.2


def build_model(folder: Path) -> Path:
    from fedtune.model.tiny import build_tiny_model

    return build_tiny_model(folder, [POEMS])


def write_job(model: Path, folder: Path, scheme: str, label_trainers: int) -> Path:
    """The example with `label_trainers` label_trainers, one epoch, the scheme's encryption, absolute paths."""
    job = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    spec = job["spec"]
    spec["input"]["pretrained_model"]["path"] = str(model)
    spec["encryption"] = ENCRYPTIONS[scheme]
    spec["trainer"]["num_train_epochs"] = 1
    spec.pop("storage", None)
    part = lambda i: [{"type": "QA", "path": str(POEMS / f"part-{i % 3}.json")}]  # noqa: E731
    spec["parties"] = [{"name": "assist_trainer", "role": "assist_trainer", "trainset": part(0)}] + [
        {"name": f"node-{i}", "role": "label_trainer", "trainset": part(i)} for i in range(1, label_trainers + 1)]
    job["metadata"]["name"] = f"parties-{scheme.replace('_', '-')}-{label_trainers}"
    path = folder / f"{scheme}-{label_trainers}.yaml"
    path.write_text(yaml.safe_dump(job, allow_unicode=True), encoding="utf-8")
    return path


def children_cpu_s() -> float:
    """CPU-seconds of every finished process this one waited for, and those they waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(job: Path, out: Path, timeout_s: float) -> dict[str, Any]:
    """One `fedtune run`: its measures, or {"failed": why}."""
    cpu, started = children_cpu_s(), time.monotonic()
    try:
        result = subprocess.run([sys.executable, "-m", "fedtune", "run", str(job), "--output", str(out),
                                 "--timeout", str(int(timeout_s))], capture_output=True, text=True,
                                timeout=timeout_s + 120)
    except subprocess.TimeoutExpired:
        return {"failed": f"no exit within {timeout_s + 120:.0f} s"}
    wall, cpu = time.monotonic() - started, children_cpu_s() - cpu
    if result.returncode != 0:
        said = (result.stderr or result.stdout).strip().splitlines() or [""]
        return {"failed": f"exit {result.returncode}: {said[-1][-300:]}"}
    summary = json.loads((out / "summary.json").read_text())
    parties = summary["parties"].values()
    log = (out / ".fedtune" / "logs" / "assist_trainer.log").read_text(encoding="utf-8", errors="replace")
    combines = [float(s) for s in COMBINED.findall(log)]
    return {
        "wall_s": wall, "cpu_s": cpu, "pss_mb": summary["peak_pss_mb"]["job"],
        "start_s": max(p["timings"]["startup_s"] for p in parties),
        "round_s": max(p["timings"]["train_s"] for p in parties) / summary["rounds"],
        "combine_s": statistics.mean(combines) if combines else float("nan"),
    }


def median(runs: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in runs if "failed" not in r]
    return statistics.median(values) if values else float("nan")


def report(scheme: str, results: dict[int, list[dict[str, Any]]]) -> None:
    sizes = sorted(results)
    base = 8 if 8 in results else sizes[0]
    wall_base = median(results[base], "wall_s")
    pss_first = median(results[sizes[0]], "pss_mb")
    print(f"\n{scheme} (ratios against {base} label_trainers; work = training parties)")
    print(f"{'label_trainers':>14} {'runs':>5} {'failed':>6} {'wall s':>8} {'cpu s':>8} {'pss MB':>8} "
          f"{'MB/extra':>8} {'start s':>8} {'round s':>8} {'combine s':>9} {'wall x':>7} {'work x':>7} {'goal':>5}")
    for n in sizes:
        runs = results[n]
        wall = median(runs, "wall_s")
        extra = (median(runs, "pss_mb") - pss_first) / (n - sizes[0]) if n != sizes[0] else float("nan")
        wall_ratio, work_ratio = wall / wall_base, (n + 1) / (base + 1)
        goal = "-" if n <= base else ("met" if wall_ratio <= GROWTH_GOAL * work_ratio else "NOT")
        print(f"{n:>14} {len(runs):>5} {sum('failed' in r for r in runs):>6} {wall:>8.1f} "
              f"{median(runs, 'cpu_s'):>8.1f} {median(runs, 'pss_mb'):>8.0f} {extra:>8.1f} "
              f"{median(runs, 'start_s'):>8.2f} {median(runs, 'round_s'):>8.2f} {median(runs, 'combine_s'):>9.4f} "
              f"{wall_ratio:>7.2f} {work_ratio:>7.2f} {goal:>5}")
        for failure in {r["failed"] for r in runs if "failed" in r}:
            print(f"{'':>14} failed: {failure}")


def combine_s(scheme: str, parties: int, redis: Any, repeat: int = 5) -> float:
    """Best time of the submission that closes a round of `parties` updates (store + combine)."""
    import numpy as np

    from fedtune.federation import transport
    from fedtune.federation.aggregator import AggregatorService
    from fedtune.federation.jobstate import JobState
    from fedtune.secagg import make_codec

    codec = make_codec(ENCRYPTIONS[scheme])
    names = [f"node-{i}" for i in range(1, parties + 1)]
    rng = np.random.default_rng(0)
    # The aggregator's work does not depend on the masks' values: encoded updates stand for masked ones.
    blobs = {n: transport.pack_tensors(codec.encode_plain({"w": rng.normal(0, 0.02, (512, 512)).astype(np.float32)}))
             for n in names}
    best = float("inf")
    for attempt in range(repeat):
        state = JobState.connect(redis.address, redis.password, f"combine-{scheme}-{parties}-{attempt}")
        service = AggregatorService(state, codec, rounds=1, round_timeout_s=600)
        service.configure({n: 1.0 / parties for n in names}, own=None)
        for name in names[:-1]:
            service.accept(1, name, blobs[name])
        started = time.perf_counter()
        service.accept(1, names[-1], blobs[names[-1]])
        best = min(best, time.perf_counter() - started)
        assert state.get_global(1) is not None
    return best


def report_combine(sizes: list[int]) -> None:
    from fedtune.local.launcher import RedisServer

    print("\naggregator combine, closing submission (512x512 float32 updates, best of 5)")
    print(f"{'updates':>8} {'plain ms':>9} {'per update':>11} {'otp ms':>9} {'per update':>11}")
    with RedisServer() as redis:
        for n in sizes:
            plain, otp = combine_s("plain", n, redis), combine_s("otp", n, redis)
            print(f"{n:>8} {plain * 1e3:>9.1f} {plain * 1e3 / n:>11.2f} {otp * 1e3:>9.1f} {otp * 1e3 / n:>11.2f}",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parties", default="2,4,8,16,32,64", help="label_trainer counts, comma-separated")
    parser.add_argument("--schemes", default="plain,otp,secagg_plus")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one run may take")
    parser.add_argument("--model", type=Path, help="an existing demo model folder (default: built here)")
    parser.add_argument("--combine", action="store_true", help="time the aggregator's combine alone, 8..64 updates")
    args = parser.parse_args()
    if args.combine:
        print(f"machine: {machine()}")
        report_combine([8, 16, 32, 64])
        return
    sizes = sorted(int(n) for n in args.parties.split(","))
    schemes = args.schemes.split(",")
    unknown = sorted(set(schemes) - set(ENCRYPTIONS))
    if unknown:
        parser.error(f"--schemes: unknown {', '.join(unknown)} (have: {', '.join(ENCRYPTIONS)})")
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="fedtune-bench-") as scratch:
        folder = Path(scratch)
        model = (args.model or build_model(folder / "model")).resolve()
        for scheme in schemes:
            results: dict[int, list[dict[str, Any]]] = {}
            for n in sizes:
                job = write_job(model, folder, scheme, n)
                results[n] = [run_once(job, folder / f"out-{scheme}-{n}-{i}", args.timeout) for i in range(args.runs)]
                print(f"  {scheme} x {n}: {json.dumps(results[n])}", flush=True)
            report(scheme, results)


if __name__ == "__main__":
    main()
