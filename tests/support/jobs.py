"""Small federated jobs for the multi-process tests (runtime, secure aggregation, cluster)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
EXAMPLE = EXAMPLES / "lora-3party.yaml"
POEMS = EXAMPLES / "data" / "poems"
# The parties of `write_job` and of the examples, the assist_trainer first.
PARTIES = ("assist_trainer", "node-1", "node-2")

LORA = {"LORA": {"task_type": "CAUSAL_LM", "r": 4, "target_modules": ["query_key_value"], "lora_alpha": 16,
                 "lora_dropout": 0.0, "bias": "none"}}
PTUNING = {"PREFIX_TUNING": {"task_type": "CAUSAL_LM", "pre_seq_len": 4, "prefix_projection": False}}


def write_share(folder: Path, part: int, count: int) -> Path:
    """The first `count` instances of a bundled poems part (`part` modulo the three), as a QA file of its own."""
    source = json.loads((POEMS / f"part-{part % 3}.json").read_text(encoding="utf-8"))
    instances = (source["instances"] * (count // len(source["instances"]) + 1))[:count]
    path = folder / f"share-{part}.json"
    path.write_text(json.dumps({"instruction": source["instruction"], "instances": instances}, ensure_ascii=False),
                    encoding="utf-8")
    return path


def write_job(folder: Path, model: Path, *, sizes: tuple[int, ...] = (12, 20, 16), peft: dict | None = None,
              encryption: dict | None = None, agg_steps: float = 0.5, epochs: float = 2, name: str = "job",
              party_overrides: dict[str, dict] | None = None, **spec_overrides: Any) -> Path:
    """A job over shares of the bundled poems: the assist_trainer with `sizes[0]` samples, then node-1, node-2, ...
    with the others (by default 3 parties, as PARTIES)."""
    folder.mkdir(parents=True, exist_ok=True)
    shares = [write_share(folder, part, n) for part, n in enumerate(sizes)]
    spec: dict[str, Any] = {
        "input": {"pretrained_model": {"path": str(model)}},
        "aggregation": {"agg_steps": agg_steps, "round_timeout_s": 120},
        "encryption": encryption or {"plain": {}},
        "peft": peft or LORA,
        "trainer": {"per_device_train_batch_size": 4, "learning_rate": 1e-2, "num_train_epochs": epochs,
                    "no_cuda": True, "seed": 7},
        "dataset": {"max_src_length": 32, "max_dst_length": 32},
        "parties": [{"name": "assist_trainer", "role": "assist_trainer", "trainset": [{"path": str(shares[0])}]}] + [
            {"name": f"node-{i}", "role": "label_trainer", "trainset": [{"path": str(share)}]}
            for i, share in enumerate(shares[1:], start=1)
        ],
    }
    for party in spec["parties"]:
        party.update((party_overrides or {}).get(party["name"], {}))
    spec.update(spec_overrides)
    job = {"apiVersion": "fedtune.io/v1alpha1", "kind": "FederatedFineTune", "metadata": {"name": name},
           "spec": spec}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job, allow_unicode=True), encoding="utf-8")
    return path


def files_only_model(folder: Path) -> Path:
    """A model folder as far as the file checks look: a config and an empty weights file (nothing loads it)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedtune", *args], capture_output=True, text=True, timeout=timeout)


def adapter_tensors(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "adapter_model.safetensors"))


def assert_identical_adapters(out: Path, checkpoint: str, parties: tuple[str, ...] = PARTIES) -> dict:
    """Every party's adapter at `out/<party>/<checkpoint>` is the same, tensor for tensor; returns it."""
    import torch

    reference = adapter_tensors(out / parties[0] / checkpoint)
    assert reference, "empty adapter"
    for party in parties[1:]:
        other = adapter_tensors(out / party / checkpoint)
        assert other.keys() == reference.keys()
        for name, tensor in reference.items():
            assert torch.equal(tensor, other[name]), f"{party}/{checkpoint}: {name} differs from {parties[0]}'s"
    return reference


def wait_until(predicate, timeout: float, what: str, local=None) -> None:
    """Poll `predicate`; fail at once, with its log, if any role of `local` (a LocalJob) dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        failed = local.failed_role() if local is not None else None
        if failed is not None:
            raise AssertionError(f"{failed.name} failed while waiting for {what}:\n{failed.log_tail(30)}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def kill_after_first_round(local, party: str = "node-1") -> None:
    """SIGKILL `party` once it has saved its resumable state after round 1, then start it again."""
    from fedtune.federation.party import STATE_DIR
    from fedtune.train.loop import latest_state

    state_dir = local.output / party / STATE_DIR / "trainer"
    wait_until(lambda: latest_state(state_dir) is not None, 240, f"{party} to save its state after round 1", local)
    assert local.status().parties[party].state != "succeeded", f"{party} finished before it could be killed"
    local.kill_role(party, signal.SIGKILL)
    local.start_role(party)



def example_documents() -> list[tuple[str, dict[str, Any]]]:
    """Every FederatedFineTune in examples/ (a file may hold other kinds too, e.g. PVCs)."""
    out = []
    for path in sorted(EXAMPLES.rglob("*.yaml")):
        if {"data", "models"} & set(path.relative_to(EXAMPLES).parts[:-1]):
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "FederatedFineTune":
                out.append((str(path.relative_to(EXAMPLES)), doc))
    return out


def processes_started_with(scratch: Path, output: Path | None = None) -> dict[int, str]:
    """The live processes (pid: command line) whose TMPDIR is `scratch`: all that a `fedtune run` started with
    that TMPDIR (its fork server, roles, ranks), itself included; and those working inside `output` (redis-server,
    whose data lie there: its own title overwrites what /proc shows of its environment)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit():
                continue
            tmpdir = f"TMPDIR={scratch}".encode() in (proc / "environ").read_bytes().split(b"\0")
            inside = output is not None and Path(os.readlink(proc / "cwd")).is_relative_to(output)
            if tmpdir or inside:
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone, or not ours to read
    return found


def pid_writing(log: Path) -> int:
    """The process whose standard output is `log`: a role of `fedtune run` (found as `ps` would)."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.readlink(proc / "fd" / "1") == str(log):
                return int(proc.name)
        except OSError:
            continue  # gone, or not ours to read
    raise AssertionError(f"no process writes {log}")


def run_killing(job: Path, out: Path, party: str, ready: Callable[[], bool], what: str,
                sig: int = signal.SIGKILL) -> tuple[int, str, str]:
    """`fedtune run JOB --output OUT`, its `party` sent `sig` (SIGKILL; SIGSTOP freezes it) once `ready()` (`what`
    names that moment); the run's exit code, stdout and stderr."""
    from fedtune.local.launcher import RUN_DIR

    run = subprocess.Popen([sys.executable, "-m", "fedtune", "run", str(job), "--output", str(out)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: ready() or run.poll() is not None, 300, what)
        os.kill(pid_writing(out / RUN_DIR / "logs" / f"{party}.log"), sig)
        stdout, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    return run.returncode, stdout, stderr
