"""What stopping a job and resuming it costs: `fedtune run` stopped by SIGTERM after round k of n, then
`fedtune run --resume`, against the same job run through uninterrupted.

"After round k": once every party has saved its resumable state for round k (right after it wrote the
round's checkpoint). A stop between the checkpoint and that save costs the party the round again.

Baseline: the job run through (wall time of `fedtune run`, start to exit). Candidate: the stopped run's
wall time plus the resumed run's. The goal: candidate <= 1.15 x baseline + the start-up of one job (a
resumed run starts its processes again, loads the model and the data again: that much is unavoidable),
where the start-up is measured too: from `fedtune run`'s start to the first optimizer step of its slowest
party (`startup_s` in summary.json), the median over the baseline's runs. The final adapters of both are
compared tensor for tensor. Runs alternate; medians are printed with the machine.

    python bench/stop_resume.py [--runs 3] [--rounds 4] [--stop-after 2] [--samples 400]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import machine

from fedtune.spec import STATE_DIR, aggregation_steps, load_job
from support.jobs import POEMS, adapter_tensors, write_job

GOAL = 1.15


def saved_round(out: Path, steps: dict[str, int]) -> bool:
    """Every party has saved its training state at (or past) its step in `steps`."""
    for party, step in steps.items():
        saved = [int(p.name.removeprefix("checkpoint-")) for p in (out / party / STATE_DIR / "trainer").glob(
            "checkpoint-*") if p.name.removeprefix("checkpoint-").isdigit()]
        if not saved or max(saved) < step:
            return False
    return True


def fedtune(*args: str, stop_when: Callable[[], bool] | None = None) -> tuple[float, int]:
    """Wall time and exit code of `fedtune ARGS`; SIGTERM once `stop_when()`."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "fedtune", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    while stop_when is not None and proc.poll() is None and not stop_when():
        time.sleep(0.05)
    if stop_when is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=3600)
    expected = (0, 143) if stop_when is not None else (0,)
    if proc.returncode not in expected:
        raise SystemExit(f"fedtune {' '.join(args)} exited {proc.returncode}:\n{stderr}")
    return time.perf_counter() - started, proc.returncode


def startup_s(out: Path) -> float:
    summary = json.loads((out / "summary.json").read_text())
    return max(p["timings"]["startup_s"] or 0.0 for p in summary["parties"].values())


def same_adapters(a: Path, b: Path) -> bool:
    import torch

    for party in ("assist_trainer", "node-1", "node-2"):
        x, y = adapter_tensors(a / party / "checkpoint-1"), adapter_tensors(b / party / "checkpoint-1")
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--stop-after", type=int, default=2, help="SIGTERM once this round's checkpoint exists")
    parser.add_argument("--samples", type=int, default=400, help="node-1's samples (the others have a tenth)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        subprocess.run([sys.executable, "-m", "fedtune", "tiny-model", str(folder / "model"), "--data", str(POEMS)],
                       check=True, capture_output=True)
        small = args.samples // 10
        sizes = {"assist_trainer": small, "node-1": args.samples, "node-2": small}
        job = write_job(folder / "job", folder / "model", sizes=tuple(sizes.values()), epochs=2,
                        agg_steps=1 / args.rounds, name="bench")
        fractions = load_job(job).spec.fractions()
        # batch 4, 2 epochs (write_job's trainer): each party's step at the end of round k
        steps = {p: aggregation_steps(fractions, 2 * math.ceil(n / 4))[args.stop_after - 1] for p, n in sizes.items()}
        baseline, candidate, stopped, startups = [], [], [], []
        for run in range(args.runs):
            out = folder / f"through-{run}"
            baseline.append(fedtune("run", str(job), "--output", str(out))[0])
            startups.append(startup_s(out))
            cut = folder / f"stopped-{run}"
            after_round = functools.partial(saved_round, cut, steps)
            first, code = fedtune("run", str(job), "--output", str(cut), stop_when=after_round)
            second = fedtune("run", str(job), "--output", str(cut), "--resume")[0] if code else 0.0
            candidate.append(first + second)
            stopped.append(code == 143)
            if not same_adapters(out, cut):
                raise SystemExit(f"run {run}: the resumed run's adapters differ from the uninterrupted run's")
    base, cand, startup = statistics.median(baseline), statistics.median(candidate), statistics.median(startups)
    print(f"machine: {machine()}")
    print(f"job: 3 parties, {args.rounds} rounds, node-1 {args.samples} samples; SIGTERM after round "
          f"{args.stop_after} ({sum(stopped)} of {args.runs} runs were stopped before they ended)")
    print(f"baseline  (uninterrupted):       median {base:.2f} s over {args.runs} runs")
    print(f"candidate (stopped + --resume):  median {cand:.2f} s over {args.runs} runs")
    print(f"start-up of one job (to the slowest party's first step): median {startup:.2f} s")
    limit = GOAL * base + startup
    print(f"ratio candidate/baseline: {cand / base:.2f}; goal candidate <= {GOAL} x baseline + start-up = "
          f"{limit:.2f} s: {'met' if cand <= limit else 'NOT met'}; final adapters identical: yes")


if __name__ == "__main__":
    main()
