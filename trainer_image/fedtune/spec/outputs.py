"""Where a job writes: output folders, checkpoint names, the steps at which rounds fall, paths."""

from __future__ import annotations

import math
from pathlib import Path

from fedtune.spec.common import SpecError
from fedtune.spec.job import FederatedFineTune

STATE_DIR = ".fedtune-state"  # inside a party's output: resumable training state and its key


def checkpoint_name(fraction: float) -> str:
    """`checkpoint-0.2` ... `checkpoint-1`, as the reference names them."""
    return f"checkpoint-{fraction:g}"


def aggregation_steps(fractions: list[float], max_steps: int) -> list[int]:
    """The global step at which each round aggregates; two rounds on one step is an error."""
    steps = [math.ceil(f * max_steps - 1e-9) for f in fractions]
    for (f1, s1), (f2, s2) in zip(zip(fractions, steps), zip(fractions[1:], steps[1:])):
        if s1 == s2 or s1 < 1:
            raise SpecError(
                f"aggregation.agg_steps is too small: rounds at fractions {f1:g} and {f2:g} both fall on "
                f"step {max(s1, 1)} of {max_steps}; raise agg_steps or train more steps"
            )
    return steps


def expand_output_path(template: str, job_id: str, party: str) -> str:
    return template.replace("[JOB_ID]", job_id).replace("[NODE_ID]", party)


def output_dirs(job: FederatedFineTune, parties: list[str], base_dir: Path) -> dict[str, Path]:
    """Each party's folder under `spec.output.path` (relative paths against `base_dir`); two local
    parties may not share one, which a template without `[NODE_ID]` would make them do."""
    assert job.spec.output is not None
    dirs: dict[str, Path] = {}
    for name in parties:
        folder = resolve_path(expand_output_path(job.spec.output.path, job.job_id, name), base_dir).resolve()
        other = next((n for n, d in dirs.items() if d == folder), None)
        if other is not None:
            raise SpecError(f"spec.output.path: parties `{other}` and `{name}` would both write to {folder}; "
                            "put [NODE_ID] in the path")
        dirs[name] = folder
    return dirs


def resolve_path(path: str, base_dir: Path) -> Path:
    """Relative paths in a spec are relative to the job file's folder (or the launcher's --base-dir)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base_dir / p)
