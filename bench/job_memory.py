"""The whole job's peak memory on the reference demo workload: `fedtune run` of the 3-party LoRA example.

The workload: the reference demo's ChatGLM-6B-shaped tiny model (a GLM of hidden 16, 2 layers,
vocabulary 130,528; random weights, since memory does not depend on their values) and
examples/lora-3party.yaml's 3-party LoRA, 5 rounds, on the bundled poems.

Measured from outside the job: every 0.25 s the proportional set size (PSS) of `fedtune run`
itself and of every process under it (Redis, the fork server, the roles), the peak of their
sum; beside it the launcher's own peak and each role's, as summary.json reports them. PSS
counts a page shared by n processes as 1/n in each, so the sum is what the job occupies; pages
of shared libraries are also shared with whatever else runs on the machine, so readings move
a little from run to run.

Baseline: the same job run by another revision of fedtune (`--baseline REV`, default `main`,
taken with `git archive`), candidate: this checkout; runs interleaved, medians and their ratio
printed with the machine. Goal: the job's peak PSS <= 1.5 GB.

    python bench/job_memory.py [--runs 3] [--baseline REV | --baseline none] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine

from fedtune.procstat import process_tree, pss_bytes

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "lora-3party.yaml"
POEMS = REPO / "examples" / "data" / "poems"
GOAL_MB = 1500.0
SAMPLE_S = 0.25


def build_model(folder: Path) -> Path:
    from fedtune.model.tiny import build_tiny_model

    return build_tiny_model(folder, [POEMS], hidden_size=16, num_layers=2, pretrain_steps=0, vocab_size=130_528)


def write_job(model: Path, folder: Path) -> Path:
    """examples/lora-3party.yaml with the model and the poems at absolute paths."""
    job = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    job["spec"]["input"]["pretrained_model"]["path"] = str(model)
    for party in job["spec"]["parties"]:
        for entry in party.get("trainset", []):
            entry["path"] = str((EXAMPLE.parent / entry["path"]).resolve())
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job, allow_unicode=True), encoding="utf-8")
    return path


def source_tree(rev: str, folder: Path) -> Path:
    """The `trainer_image` folder of revision `rev`, extracted into `folder`."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "trainer_image"], capture_output=True,
                             check=True).stdout
    folder.mkdir(parents=True)
    archive_path = folder / "tree.tar"
    archive_path.write_bytes(archive)
    with tarfile.open(archive_path) as tar:
        tar.extractall(folder, filter="data")
    return folder / "trainer_image"


class Sampler(threading.Thread):
    """The peak PSS of a process with everything under it, and of the process alone."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.tree_peak = 0
        self.own_peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(SAMPLE_S):
            readings = {p: pss_bytes(p) for p in process_tree(self.pid)}
            self.tree_peak = max(self.tree_peak, sum(r for r in readings.values() if r))
            self.own_peak = max(self.own_peak, readings.get(self.pid) or 0)


def run_once(tree: Path, job: Path, out: Path) -> dict[str, float]:
    """One `fedtune run` with the fedtune of `tree`: peaks in MB (job: the whole tree; launcher; each role)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    log = out.with_suffix(".log")
    with log.open("wb") as stream:
        proc = subprocess.Popen([sys.executable, "-m", "fedtune", "run", str(job), "--output", str(out)],
                                stdout=stream, stderr=subprocess.STDOUT, env=env)
        sampler = Sampler(proc.pid)
        sampler.start()
        code = proc.wait()
        sampler.done.set()
        sampler.join()
    if code != 0:
        raise SystemExit(f"fedtune run ({tree}) exited {code}; see {log}:\n{log.read_text()[-3000:]}")
    roles = json.loads((out / "summary.json").read_text())["peak_pss_mb"]
    measured = {name: mb for name, mb in roles.items() if name != "job" and mb is not None}
    return {**measured, "job": sampler.tree_peak / 1e6, "launcher": sampler.own_peak / 1e6}


def show(name: str, runs: list[dict[str, float]]) -> float:
    keys = ["job", "launcher", *sorted({k for r in runs for k in r} - {"job", "launcher"})]
    print(f"{name}:")
    for key in keys:
        values = [r[key] for r in runs if key in r]
        print(f"  {key:16s} median {statistics.median(values):8.1f} MB  (runs: "
              f"{', '.join(f'{v:.1f}' for v in values)})")
    return statistics.median(r["job"] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline", default="main", help="git revision to compare against, or `none`")
    parser.add_argument("--model", type=Path, help="an existing demo-shape model folder (default: built here)")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="fedtune-bench-") as scratch:
        folder = Path(scratch)
        model = args.model or build_model(folder / "model")
        job = write_job(model.resolve(), folder)
        trees = {"candidate (this checkout)": REPO / "trainer_image"}
        if args.baseline != "none":
            trees = {f"baseline ({args.baseline})": source_tree(args.baseline, folder / "baseline"), **trees}
        results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
        for i in range(args.runs):
            for j, (name, tree) in enumerate(trees.items()):
                results[name].append(run_once(tree, job, folder / f"out-{i}-{j}"))
    print("peak PSS of the demo job (hidden 16, 2 layers, vocabulary 130,528; 3-party LoRA, 5 rounds):")
    medians = {name: show(name, runs) for name, runs in results.items()}
    candidate = medians["candidate (this checkout)"]
    if len(medians) > 1:
        print(f"ratio candidate / baseline (job): {candidate / next(iter(medians.values())):.3f}")
    print(f"goal: job <= {GOAL_MB:.0f} MB: {'met' if candidate <= GOAL_MB else 'NOT met'}")


if __name__ == "__main__":
    main()
