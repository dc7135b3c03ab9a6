"""Fine-tuning a 6-9 B GLM: plain transformers + peft versus a 2-party fedtune job (tokens/s, MFU, peak memory).

Models: ChatGLM3-6B- and GLM-4-9B-shaped native GLMs (28 and 40 layers, hidden 4096, 32 heads, 2
key/value groups, vocabularies of 65,024 and 151,552) with random weights: nothing is downloaded.
Both runs hold the base in bfloat16 and train LoRA r=8 on the attention projections
(`query_key_value` -> q, k, v) in float32 under bf16 autocast, on the same synthetic data (every
sample the same length, so tokens per step are known), with the same per-party steps and batch.

- baseline: two processes side by side, each training one party's share with plain
  transformers' Trainer + peft (as the job's two parties run side by side);
- candidate: `fedtune run` of a 2-party job (assist_trainer with data, one label_trainer,
  `agg_steps: 0.2`, real redis-server and gRPC).

tokens/s counts every party's tokens from its first optimizer step to its last. MFU = tokens/s x
model FLOPs per token / the devices' peak bf16 FLOP/s, where a LoRA step costs 4N per token for the
frozen N weights (forward 2N, backward through the activations 2N; no weight gradients) plus
attention (3 x 4 x layers x sequence x heads x head_dim). Peak memory is the most device memory in
use during the run (both processes, CUDA contexts included; halved per party). Goals:
federated >= 0.98 x plain throughput; MFU >= 40 %.

1 vs N ranks in one party, where N devices exist: the same job with the label_trainer training
alone (the assist_trainer only aggregates, on the CPU), once with one rank and once with N
(`resources.gpu: N`: a GPU each, NCCL), at the same per-device batch and steps: that party's
tokens/s, their ratio (ideal: N) and the peak memory of its first device.

Without CUDA, `--cpu-sized` (the default there) runs the same comparison on the same architecture
scaled down, in float32: it checks the harness end to end, its speeds say nothing of GPUs. There,
1 vs N ranks compares one process with `--ranks` gloo ranks (a thread each), and peak memory is
the resident memory of all the job's processes.
`--estimate-memory` prints the peak memory per party of the full-size shapes estimated on the meta
device (no memory, no compute): the figures the README quotes where no GPU was measured.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine

LORA = {"task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": ["query_key_value"]}
PARTIES = ("assist_trainer", "node-1")
# Dense bf16 tensor-core peaks (FLOP/s) by device name; MFU is not printed for devices not listed.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
             "L40": 181e12, "A10": 125e12, "4090": 165e12}


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    def config(self) -> Any:
        from transformers import GlmConfig

        return GlmConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.ffn,
                         num_hidden_layers=self.layers, num_attention_heads=self.heads,
                         num_key_value_heads=self.kv_heads, head_dim=self.head_dim, tie_word_embeddings=False,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3, max_position_embeddings=8192)

    def weights(self) -> int:
        attention = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim + self.heads * self.head_dim * (
            self.hidden + 1) + 2 * self.kv_heads * self.head_dim
        mlp = 3 * self.hidden * self.ffn
        return self.layers * (attention + mlp + 2 * self.hidden) + 2 * self.vocab * self.hidden + self.hidden

    def flops_per_token(self, seq: int) -> float:
        return 4 * self.weights() + 3 * 4 * self.layers * seq * self.heads * self.head_dim


SHAPES = {
    "chatglm3-6b": Shape(vocab=65024, hidden=4096, ffn=13696, layers=28, heads=32, kv_heads=2, head_dim=128),
    "glm4-9b": Shape(vocab=151552, hidden=4096, ffn=13696, layers=40, heads=32, kv_heads=2, head_dim=128),
}
CPU_SHAPES = {name: replace(shape, hidden=128, ffn=344, layers=2, heads=4, kv_heads=2, head_dim=32, vocab=4096)
              for name, shape in SHAPES.items()}


# --- data and model -------------------------------------------------------------------------


def write_data(folder: Path, chars: str, samples: int, length: int, seed: int) -> Path:
    """QA samples of exactly `length` characters a side (a token per character): every step has the same tokens."""
    rng = random.Random(seed)
    instances = [{"input": "".join(rng.choices(chars, k=length)), "output": "".join(rng.choices(chars, k=length))}
                 for _ in range(samples)]
    path = folder / f"data-{seed}.json"
    path.write_text(json.dumps({"instruction": "续写", "instances": instances}, ensure_ascii=False), encoding="utf-8")
    return path


def build_model(folder: Path, shape: Shape, chars: str, device: str, dtype: str) -> Path:
    import torch
    from transformers import GlmForCausalLM

    from fedtune.model.tiny import build_tokenizer

    tokenizer = build_tokenizer(sorted(set(chars + "续写：问答\n{}")))
    torch.manual_seed(0)
    with torch.device(device):
        model = GlmForCausalLM(shape.config()).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


# --- the two runs ---------------------------------------------------------------------------


def job_document(model: Path, shares: list[Path], args: argparse.Namespace, dtype: str, on_cpu: bool) -> dict:
    return {
        "apiVersion": "fedtune.io/v1alpha1", "kind": "FederatedFineTune", "metadata": {"name": "gpu-bench"},
        "spec": {
            "input": {"pretrained_model": {"path": str(model), "dtype": dtype}},
            "aggregation": {"agg_steps": 0.2},
            "peft": {"LORA": LORA},
            "trainer": {"per_device_train_batch_size": args.batch, "learning_rate": 1e-4, "max_steps": args.steps,
                        "no_cuda": on_cpu, "seed": 42},
            "dataset": {"max_src_length": args.length + 16, "max_dst_length": args.length + 1,
                        "prompt_pattern": "{}：\n问：{}\n答："},
            "parties": [{"name": name, "role": "assist_trainer" if i == 0 else "label_trainer",
                         "trainset": [{"path": str(shares[i])}]} for i, name in enumerate(PARTIES)],
        },
    }


def plain(job_file: Path, party: str) -> None:
    """One party's share trained by transformers' Trainer + peft alone: no fedtune runtime in the loop."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from fedtune.spec import load_job
    from fedtune.train.data import FeatureDataset, collator_for, load_qa, tokenize_qa

    threads = os.environ.get("FEDTUNE_TORCH_THREADS")  # the same threads per process as the job's parties
    if threads:
        torch.set_num_threads(int(threads))
    spec = load_job(job_file).spec
    base = spec.input.pretrained_model
    on_cpu = spec.trainer.no_cuda
    dtype = torch.float32 if base.dtype in ("auto", "float32") and on_cpu else getattr(torch, base.dtype)
    tokenizer = AutoTokenizer.from_pretrained(base.path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(base.path, local_files_only=True, dtype=dtype)
    model = get_peft_model(model, LoraConfig(**dict(LORA, target_modules=["q_proj", "k_proj", "v_proj"])))
    features = tokenize_qa(load_qa(spec.trainset(spec.party(party)), job_file.parent, spec.dataset), tokenizer,
                           spec.dataset)
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            if torch.cuda.is_available() and not on_cpu:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="bench-plain-"), max_steps=spec.trainer.max_steps,
                             per_device_train_batch_size=spec.trainer.per_device_train_batch_size,
                             learning_rate=spec.trainer.learning_rate, bf16=dtype == torch.bfloat16, use_cpu=on_cpu,
                             save_strategy="no", logging_steps=1, report_to="none", disable_tqdm=True,
                             remove_unused_columns=False, seed=spec.trainer.seed)
    Trainer(model=model, args=args, train_dataset=FeatureDataset(features), data_collator=collator_for(tokenizer),
            callbacks=[Stamp()]).train()
    print(json.dumps({"party": party, "steps": len(stamps), "train_s": stamps[-1] - stamps[0],
                      "tokens_per_step": len(features[0]["input_ids"]) * spec.trainer.per_device_train_batch_size}))


class PeakSampler:
    """The most memory in use while it runs: device memory on CUDA, else the resident memory of child processes."""

    def __init__(self, on_gpu: bool) -> None:
        self.on_gpu, self.peak, self._stop = on_gpu, 0, threading.Event()
        self.idle = self._used()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _used(self) -> int:
        if self.on_gpu:
            import torch

            free, total = torch.cuda.mem_get_info()
            return total - free
        import psutil

        children = psutil.Process().children(recursive=True)
        return sum(p.memory_info().rss for p in children if p.is_running())

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.peak = max(self.peak, self._used() - self.idle)
            except Exception:  # a child that just exited
                continue

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_plain(job_file: Path, on_gpu: bool) -> tuple[float, int]:
    with PeakSampler(on_gpu) as sampler:
        procs = [subprocess.Popen([sys.executable, __file__, "--plain", str(job_file), party],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for party in PARTIES]
        outputs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("a plain run failed")
    results = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    return sum((r["steps"] - 1) * r["tokens_per_step"] / r["train_s"] for r in results), sampler.peak


def run_federated(job_file: Path, out: Path, on_gpu: bool, tokens_per_step: int) -> tuple[float, int]:
    with PeakSampler(on_gpu) as sampler:
        done = subprocess.run([sys.executable, "-m", "fedtune", "run", str(job_file), "--output", str(out)],
                              capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the federated run failed:\n{done.stderr[-3000:]}")
    parties = json.loads((out / "summary.json").read_text())["parties"].values()
    training = [p for p in parties if len(p["losses"]) > 1]  # an assist_trainer may only aggregate
    return sum((len(p["losses"]) - 1) * tokens_per_step / p["timings"]["train_s"] for p in training), sampler.peak


def peak_flops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16.items() if key in name), None)


def compare(name: str, shape: Shape, args: argparse.Namespace, work: Path, on_gpu: bool) -> None:
    chars = "".join(chr(0x4E00 + i) for i in range(200))
    dtype = "bfloat16" if on_gpu else "float32"
    folder = work / name
    folder.mkdir()
    model = build_model(folder / "model", shape, chars, "cuda" if on_gpu else "cpu", dtype)
    shares = [write_data(folder, chars, args.batch * args.steps, args.length, seed) for seed in range(len(PARTIES))]
    job_file = folder / "job.yaml"
    job_file.write_text(yaml.safe_dump(job_document(model, shares, args, dtype, not on_gpu), allow_unicode=True))
    plain_tps, plain_peak = run_plain(job_file, on_gpu)
    from transformers import AutoTokenizer

    from fedtune.spec import load_job
    from fedtune.train.data import load_qa, tokenize_qa

    spec = load_job(job_file).spec
    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    sequence = len(tokenize_qa(load_qa(spec.trainset(spec.parties[0]), folder, spec.dataset)[:1], tokenizer,
                               spec.dataset)[0]["input_ids"])
    fed_tps, fed_peak = run_federated(job_file, folder / "out", on_gpu, sequence * args.batch)
    flops, peak = shape.flops_per_token(sequence), peak_flops()
    mfu = (lambda tps: f"{100 * tps * flops / peak:.1f} %") if peak else (lambda tps: "n/a")
    print(f"\n{name}: {shape.weights() / 1e6:,.1f} M weights, sequence {sequence}, batch {args.batch}, "
          f"{args.steps} steps per party, {dtype}")
    print(f"  plain transformers + peft: {plain_tps:10.1f} tokens/s  MFU {mfu(plain_tps):>8}  "
          f"peak {plain_peak / 2 / 2**30:.2f} GiB per party")
    print(f"  fedtune, 2 parties:        {fed_tps:10.1f} tokens/s  MFU {mfu(fed_tps):>8}  "
          f"peak {fed_peak / 2 / 2**30:.2f} GiB per party")
    print(f"  federated / plain throughput: {fed_tps / plain_tps:.3f}  (goal >= 0.98)")
    compare_ranks(folder, model, shares, args, dtype, on_gpu, sequence)


def compare_ranks(folder: Path, model: Path, shares: list[Path], args: argparse.Namespace, dtype: str, on_gpu: bool,
                  sequence: int) -> None:
    """One party with 1 rank and with N: the label_trainer trains alone, the same per-device batch and steps."""
    import torch

    count = torch.cuda.device_count() if on_gpu else args.ranks
    if count < 2:
        print(f"  1 vs N ranks in one party: skipped, {count} CUDA device here")
        return
    results = {}
    for ranks in (1, count):
        document = job_document(model, shares, args, dtype, not on_gpu)
        assist, label = document["spec"]["parties"]
        del assist["trainset"]
        assist["trainer"] = {"no_cuda": True}  # it only aggregates: off the devices measured
        label.update({"resources": {"gpu": ranks}} if on_gpu else {"ranks": ranks})
        job_file = folder / f"ranks-{ranks}.yaml"
        job_file.write_text(yaml.safe_dump(document, allow_unicode=True))
        results[ranks] = run_federated(job_file, folder / f"ranks-{ranks}", on_gpu, sequence * args.batch * ranks)
    where = "GiB on its first GPU" if on_gpu else "GiB resident, all the job's processes"
    for ranks, (tps, peak) in results.items():
        print(f"  one party, {ranks} rank(s):     {tps:10.1f} tokens/s  peak {peak / 2**30:.2f} {where}")
    print(f"  {count} ranks / 1 rank throughput: {results[count][0] / results[1][0]:.3f}  (ideal {count})")


# --- memory estimate ------------------------------------------------------------------------


class PeakMemory:
    """Bytes of tensor storage alive at the worst moment, counted as every op creates storages (works on meta)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
                out = func(*args, **(kwargs or {}))
                for item in tree_flatten(out)[0]:
                    tracker.track(item)
                return out

        self.mode = Mode()

    def track(self, item: Any) -> None:
        import torch

        if not isinstance(item, torch.Tensor):
            return
        storage = item.untyped_storage()
        key = storage._cdata
        if key not in self.live:
            self.live[key] = storage.nbytes()
            self.current += self.live[key]
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key)


def estimate_memory(shape: Shape, batch: int, sequence: int, checkpointing: bool) -> tuple[int, int]:
    """(weights, peak) bytes of one LoRA training step of a bf16 base, built and run on the meta device."""
    import torch
    from transformers import GlmForCausalLM

    # A ready 4D causal mask: transformers' own mask building reads values, which meta tensors have not.
    mask = torch.ones(batch, 1, sequence, sequence, dtype=torch.bool, device="meta").tril()
    return estimate_model_memory(lambda: GlmForCausalLM(shape.config()), ["q_proj", "k_proj", "v_proj"], batch,
                                 sequence, checkpointing, {"attention_mask": mask})


def estimate_model_memory(build: Any, targets: list[str], batch: int, sequence: int, checkpointing: bool,
                          extra: dict[str, Any] | None = None) -> tuple[int, int]:
    """(weights, peak) bytes of one LoRA step (r=8 on `targets`) of the bf16 model `build()` makes, on meta."""
    import torch
    from peft import LoraConfig, get_peft_model

    with torch.device("meta"):
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = build()
        finally:
            torch.set_default_dtype(torch.float32)
        model = get_peft_model(model, LoraConfig(**dict(LORA, target_modules=targets)))
        ids = torch.zeros(batch, sequence, dtype=torch.long)
    tracker = PeakMemory()
    for param in model.parameters():
        tracker.track(param)
    tracker.track(ids)
    weights = tracker.current
    # fedtune's loss (fedtune.model.loss) never builds the logits: the model returns its final hidden states and the
    # cross-entropy runs over the vocabulary a few rows at a time, keeping only d(loss)/d(hidden). Its values
    # cannot be computed on the meta device, so a loss over the hidden states stands in, of the same memory.
    head = model.get_base_model().lm_head  # still in memory during training: keep it counted
    model.get_base_model().lm_head = torch.nn.Identity()
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    with tracker.mode:
        hidden = model(input_ids=ids, **(extra or {})).logits
        (hidden.float() * 1e-3).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert head.weight.is_meta
    return weights, tracker.peak


def print_estimates(batch: int, sequence: int) -> None:
    print(f"\npeak memory per party, estimated on the meta device: bf16 base, LoRA r=8 on q/k/v in float32, AdamW, "
          "fedtune's loss, "
          f"batch {batch}, sequence {sequence} (the defaults: per_device_train_batch_size 4, max_src_length + "
          "max_dst_length 200); tensors only, without the allocator's slack and the CUDA context (~0.5-1 GiB)")
    for name, shape in SHAPES.items():
        for checkpointing in (False, True):
            weights, peak = estimate_memory(shape, batch, sequence, checkpointing)
            print(f"  {name:12} gradient_checkpointing {str(checkpointing).lower():5}: weights "
                  f"{weights / 2**30:6.2f} GiB, peak {peak / 2**30:6.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    parser.add_argument("--cpu-sized", action="store_true", help="scaled-down shapes in float32 on the CPU "
                        "(the default without CUDA)")
    parser.add_argument("--estimate-memory", action="store_true", help="only print the meta-device estimates")
    parser.add_argument("--batch", type=int, default=None, help="per-device batch (4 on GPU, 2 on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per party (30 on GPU, 10 on CPU)")
    parser.add_argument("--length", type=int, default=None, help="characters of each question and answer "
                        "(240 on GPU, 24 on CPU)")
    parser.add_argument("--ranks", type=int, default=2, help="gloo ranks of the one-party comparison on the CPU "
                        "(on GPUs: every device)")
    args = parser.parse_args()
    import torch

    print(f"machine: {machine()}")
    if args.estimate_memory:
        print_estimates(4, 200)
        return
    on_gpu = torch.cuda.is_available() and not args.cpu_sized
    print(f"device: {torch.cuda.get_device_name() if on_gpu else 'CPU (cpu-sized shapes, float32)'}")
    args.batch = args.batch or (4 if on_gpu else 2)
    args.steps = args.steps or (30 if on_gpu else 10)
    args.length = args.length or (240 if on_gpu else 24)
    if not on_gpu:
        os.environ.setdefault("FEDTUNE_TORCH_THREADS", "1")
    shapes = SHAPES if on_gpu else CPU_SHAPES
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-finetune-"))
    for name in args.shapes:
        compare(name, shapes[name], args, work, on_gpu)
    print(f"\nwork folder: {work}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--plain":
        plain(Path(sys.argv[2]), sys.argv[3])
    else:
        main()
