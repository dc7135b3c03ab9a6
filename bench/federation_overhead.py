"""What federation costs: the same data and optimizer steps, standalone versus a 3-party fedtune job.

Baseline: each party's share trained by plain transformers Trainer + peft in its own
process, the three processes side by side (as the parties of the job run side by side).
Candidate: `fedtune run` of the 3-party LoRA job (assist_trainer with data, two
label_trainers, agg_steps 0.2, TLS on, real redis-server and gRPC). Both use the same GLM
model, sized so that one optimizer step takes at least 50 ms here, the same data, batch
size, steps and threads per process. Prints wall time per optimizer step and the ratio.
Goal: federated / standalone <= 1.10.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine

REPO = Path(__file__).resolve().parents[1]
POEMS = REPO / "examples" / "data" / "poems"
PARTIES = ("assist_trainer", "node-1", "node-2")
LORA = {"task_type": "CAUSAL_LM", "r": 8, "target_modules": ["query_key_value"], "lora_alpha": 32,
        "lora_dropout": 0.1, "bias": "none"}


def job_document(model: Path, shares: list[Path], args: argparse.Namespace) -> dict:
    return {
        "apiVersion": "fedtune.io/v1alpha1", "kind": "FederatedFineTune", "metadata": {"name": "bench"},
        "spec": {
            "input": {"pretrained_model": {"path": str(model)}},
            "aggregation": {"agg_steps": 0.2},
            "peft": {"LORA": LORA},
            "trainer": {"per_device_train_batch_size": args.batch, "learning_rate": 1e-3,
                        "num_train_epochs": args.epochs, "no_cuda": True, "seed": 42},
            "dataset": {"max_src_length": 64, "max_dst_length": 64},
            "parties": [{"name": name, "role": "assist_trainer" if i == 0 else "label_trainer",
                         "trainset": [{"path": str(shares[i])}]} for i, name in enumerate(PARTIES)],
        },
    }


def standalone(job_file: Path, party: str, threads: int) -> None:
    """One party's share, trained by plain transformers + peft: no fedtune runtime involved."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed

    from fedtune.spec import load_job
    from fedtune.train.data import FeatureDataset, collator_for, load_qa, tokenize_qa
    from fedtune.train.loop import plan_max_steps

    torch.set_num_threads(threads)
    spec = load_job(job_file).spec
    me = spec.party(party)
    set_seed(spec.trainer.seed)
    tokenizer = AutoTokenizer.from_pretrained(spec.input.pretrained_model.path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(spec.input.pretrained_model.path, local_files_only=True)
    config = dict(LORA, target_modules=["q_proj", "k_proj", "v_proj"])
    model = get_peft_model(model, LoraConfig(**config))
    features = tokenize_qa(load_qa(spec.trainset(me), job_file.parent, spec.dataset), tokenizer, spec.dataset)
    trainer_args = spec.trainer_args(me)
    steps = plan_max_steps(len(features), trainer_args)
    out = tempfile.mkdtemp(prefix="bench-standalone-")
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=trainer_args["per_device_train_batch_size"],
                             learning_rate=trainer_args["learning_rate"], max_steps=steps, use_cpu=True,
                             save_strategy="no", logging_steps=1, report_to="none", disable_tqdm=True,
                             remove_unused_columns=False, seed=trainer_args["seed"])
    trainer = Trainer(model=model, args=args, train_dataset=FeatureDataset(features),
                      data_collator=collator_for(tokenizer))
    started = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - started
    model.save_pretrained(out)  # what a standalone run ends with: its adapter on disk
    print(json.dumps({"party": party, "steps": steps, "train_s": train_s}))


def run_standalone(job_file: Path, threads: int) -> tuple[float, int, float]:
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--standalone", str(job_file), party, str(threads)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for party in PARTIES]
    outputs = [p.communicate()[0] for p in procs]
    elapsed = time.perf_counter() - start
    if any(p.returncode for p in procs):
        raise SystemExit("a standalone run failed")
    results = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    return elapsed, sum(r["steps"] for r in results), max(r["train_s"] for r in results)


def run_federated(job_file: Path, out: Path, threads: int) -> tuple[float, int, dict]:
    env = {**os.environ, "FEDTUNE_TORCH_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fedtune", "run", str(job_file), "--output", str(out)],
                          capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"the federated run failed:\n{done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    steps = sum(p["max_steps"] for p in summary["parties"].values())
    return elapsed, steps, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // 3 or 1))
    args = parser.parse_args()
    print(f"machine: {machine()}")
    from fedtune.model.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench-federation-"))
    model = build_tiny_model(work / "model", [POEMS], hidden_size=args.hidden, num_layers=args.layers,
                             heads=8, kv_heads=4)
    shares = [POEMS / f"part-{i}.json" for i in range(3)]
    job_file = work / "job.yaml"
    job_file.write_text(yaml.safe_dump(job_document(model, shares, args), allow_unicode=True))
    print(f"model: GLM hidden {args.hidden}, {args.layers} layers; batch {args.batch}; {args.epochs:g} epochs; "
          f"{args.threads} torch thread(s) per process")

    base_runs, fed_runs = [], []
    for i in range(args.repeats):  # interleaved, so a busy moment of the machine hits both alike
        base_s, base_steps, base_train_s = run_standalone(job_file, args.threads)
        fed_s, fed_steps, summary = run_federated(job_file, work / f"out-{i}", args.threads)
        assert base_steps == fed_steps, (base_steps, fed_steps)
        base_runs.append(base_s)
        fed_runs.append(fed_s)
        fed_train_s = max(p["timings"]["train_s"] for p in summary["parties"].values())
        print(f"run {i + 1}: standalone {base_s:.1f} s, federated {fed_s:.1f} s; of which the training loop: "
              f"standalone {base_train_s:.1f} s, federated {fed_train_s:.1f} s (the longest party)")
    base_s, fed_s = statistics.median(base_runs), statistics.median(fed_runs)
    step_ms = {name: 1000 * p["timings"]["train_s"] / max(p["max_steps"] - 1, 1)
               for name, p in summary["parties"].items()}
    waits = {name: p["timings"]["aggregation_wait_s"] for name, p in summary["parties"].items()}
    per_party = ", ".join(f"{n} {p['max_steps']}" for n, p in summary["parties"].items())
    print(f"optimizer steps: {fed_steps} in all ({per_party})")
    print("per-step time inside the federated job: " + ", ".join(f"{n} {ms:.0f} ms" for n, ms in step_ms.items()))
    print("time spent in aggregation rounds: " + ", ".join(f"{n} {s:.2f} s" for n, s in waits.items()))
    print(f"standalone: median {base_s:.1f} s wall, {1000 * base_s / base_steps:.1f} ms per optimizer step")
    print(f"federated:  median {fed_s:.1f} s wall, {1000 * fed_s / fed_steps:.1f} ms per optimizer step")
    print(f"ratio federated / standalone: {fed_s / base_s:.3f} (goal <= 1.10)")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--standalone":
        standalone(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    else:
        main()
