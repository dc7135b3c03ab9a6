"""How fast bad input fails: `fedtune run` on a job whose dataset is malformed, before anything starts.

Baseline: the interpreter starting and importing the command line (`python -c "import fedtune.cli"`),
the floor any `fedtune` command pays. Candidate: `fedtune run JOB` whose party's dataset is cut
off mid-JSON; it must exit 2 naming the file, within 2 s. Both are run alternately, the median of
each printed with the ratio and the machine.

    python bench/bad_input.py [--runs 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import machine

from support.jobs import write_job

LIMIT_S = 2.0


def timed(argv: list[str], expect: int) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - started
    if done.returncode != expect:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}, expected {expect}:\n{done.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        model = folder / "model"  # never loaded: the dataset fails first
        model.mkdir()
        (model / "config.json").write_text("{}")
        (model / "model.safetensors").write_bytes(b"")
        job = write_job(folder / "job", model)
        (folder / "job" / "share-2.json").write_text('{"instruction": "x", "instances": [', encoding="utf-8")
        baseline_argv = [sys.executable, "-c", "import fedtune.cli"]
        candidate_argv = [sys.executable, "-m", "fedtune", "run", str(job), "--output", str(folder / "out")]
        baseline, candidate = [], []
        for _ in range(args.runs):
            baseline.append(timed(baseline_argv, 0))
            candidate.append(timed(candidate_argv, 2))
    base, cand = statistics.median(baseline), statistics.median(candidate)
    print(f"machine: {machine()}")
    print(f"baseline  (python -c 'import fedtune.cli'):        median {base:.3f} s over {args.runs} runs")
    print(f"candidate (fedtune run, malformed dataset, exit 2): median {cand:.3f} s over {args.runs} runs")
    print(f"ratio candidate/baseline: {cand / base:.2f}; within {LIMIT_S:g} s: {'yes' if cand < LIMIT_S else 'NO'}")


if __name__ == "__main__":
    main()
