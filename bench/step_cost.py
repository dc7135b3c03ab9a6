"""What one training step costs per answer token: fedtune's step versus a plain transformers + peft loop.

Both train the same LoRA adapter (r=8 on the attention projections, the demo's settings) of
the same GLM on the same batches of the bundled poems, one optimizer step per batch:

- plain: `loss = model(**padded_batch).loss; loss.backward(); optimizer.step()`, transformers'
  own loss over every position's full-vocabulary logits;
- fedtune: the step fedtune's Trainer takes (`fedtune.model.loss.causal_lm_loss`: only the answer
  positions, chunked cross-entropy), on the same padded batches, and on packed rows
  (`dataset.packing`).

Measured in CPU seconds of this process (time.process_time, not wall time: the machine may be
busy) per 1,000 trained answer tokens, repeats interleaved so a busy moment hits all alike.
Shapes: `demo` (the reference demo's ChatGLM-6B-shaped tiny model: hidden 16, 2 layers,
vocabulary 130,528) and `1b` (a 1B-class GLM: hidden 2048, 16 layers, vocabulary 151,552,
random weights, short sequences). With a CUDA device, `--gpu` also measures the GLM-4-9B shape
in bf16: tokens/s and peak memory, with Liger-Kernel's fused loss when installed.
Goals: fedtune / plain <= 0.5 CPU-s per answer token on the demo shape; on GPU >= 1.3x the
plain loop's tokens/s with lower peak memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine

REPO = Path(__file__).resolve().parents[1]
POEMS = REPO / "examples" / "data" / "poems"


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_src: int
    max_dst: int
    batch: int
    steps: int  # optimizer steps per variant and repeat


SHAPES = {
    "demo": Shape("demo (ChatGLM-6B-shaped tiny model)", 16, 2, 4, 2, 64, 130_528, 64, 64, 4, 24),
    "1b": Shape("1B-class GLM", 2048, 16, 16, 2, 5632, 151_552, 24, 16, 4, 2),
    "9b": Shape("GLM-4-9B", 4096, 40, 32, 2, 13696, 151_552, 256, 256, 8, 10),
}


def build(shape: Shape, device: str, dtype) -> tuple:
    """A random-weight GLM of the shape with the demo's LoRA, the poems tokenised, and batches of them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GlmForCausalLM

    from fedtune.model.tiny import build_config, build_tokenizer, corpus_characters
    from fedtune.spec import Dataset, TrainsetEntry
    from fedtune.train.data import load_qa, tokenize_qa

    tokenizer = build_tokenizer(corpus_characters([POEMS]))
    config = build_config(shape.vocab, hidden_size=shape.hidden, num_layers=shape.layers, heads=shape.heads,
                          kv_heads=shape.kv_heads, kind="glm", intermediate_size=shape.intermediate)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype and on its device: a 9B model never exists in float32
    try:
        with torch.device(device):
            model = GlmForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=32, lora_dropout=0.1,
                                             target_modules=["q_proj", "k_proj", "v_proj"]))
    model.train()
    dataset = Dataset(max_src_length=shape.max_src, max_dst_length=shape.max_dst)
    items = load_qa([TrainsetEntry(path=str(POEMS))], POEMS, dataset)
    features = tokenize_qa(items, tokenizer, dataset)
    features = (features * (shape.batch * shape.steps // len(features) + 1))[: shape.batch * shape.steps]
    return model, tokenizer, [features[i : i + shape.batch] for i in range(0, len(features), shape.batch)]


def answer_tokens(batch: list[dict]) -> int:
    return sum(sum(1 for label in f["labels"] if label != -100) for f in batch)


def steps(model, batches: list, collate: Callable, loss_of: Callable, device: str) -> Callable[[], float]:
    """One pass over the batches, one optimizer step each; returns the last loss."""
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    collated = [{k: v.to(device) for k, v in collate(b).items()} for b in batches]

    def run() -> float:
        loss = torch.zeros(())
        for batch in collated:
            loss = loss_of(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return run


def variants(model, tokenizer, batches: list, device: str) -> dict[str, Callable[[], float]]:
    from fedtune.model.loss import causal_lm_loss
    from fedtune.train.data import collator_for

    padded, packed = collator_for(tokenizer), collator_for(tokenizer, packing=True)
    plain = lambda m, b: m(**b).loss  # noqa: E731 - transformers' own loss, every position
    ours = lambda m, b: causal_lm_loss(m, b)  # noqa: E731
    return {
        "plain transformers + peft": steps(model, batches, padded, plain, device),
        "fedtune": steps(model, batches, padded, ours, device),
        "fedtune, dataset.packing": steps(model, batches, packed, ours, device),
    }


def check_equal_loss(model, tokenizer, batch: list) -> float:
    """The same loss from both computations on one batch (adapter untouched), as a sanity check."""
    import torch

    from fedtune.model.loss import causal_lm_loss
    from fedtune.train.data import collator_for

    model.eval()  # no dropout: the two forward passes see the same network
    with torch.no_grad():
        inputs = {k: v.to(model.device) for k, v in collator_for(tokenizer)(batch).items()}
        difference = abs(float(model(**inputs).loss) - float(causal_lm_loss(model, inputs)))
    model.train()
    return difference


def cpu_section(shape: Shape, repeats: int) -> float:
    import torch

    model, tokenizer, batches = build(shape, "cpu", torch.float32)
    tokens = sum(answer_tokens(b) for b in batches)
    print(f"\n{shape.name}: hidden {shape.hidden}, {shape.layers} layers, vocabulary {shape.vocab:,}; "
          f"{len(batches)} batches of {shape.batch}, {tokens} answer tokens per pass; "
          f"|plain loss - fedtune loss| = {check_equal_loss(model, tokenizer, batches[0]):.2e}")
    runs = variants(model, tokenizer, batches, "cpu")
    if shape.hidden < 1024:  # warm-up (first-call allocations, lazy set-up): noise only where steps are short
        for run in runs.values():
            run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.process_time()
            run()
            seconds[name].append(time.process_time() - started)
    per_k = {name: 1000 * statistics.median(s) / tokens for name, s in seconds.items()}
    for name, cost in per_k.items():
        print(f"  {name:28s} {cost:8.3f} CPU-s per 1,000 answer tokens "
              f"(runs: {', '.join(f'{s:.2f}' for s in seconds[name])} CPU-s)")
    base = per_k["plain transformers + peft"]
    for name in ("fedtune", "fedtune, dataset.packing"):
        print(f"  ratio {name} / plain: {per_k[name] / base:.3f}")
    del model
    return per_k["fedtune"] / base


def gpu_section(repeats: int) -> None:
    import torch

    if not torch.cuda.is_available():
        print("\nGPU section: no CUDA device here; run with --gpu where one exists (GLM-4-9B shape, bf16)")
        return
    shape = SHAPES["9b"]
    model, tokenizer, batches = build(shape, "cuda", torch.bfloat16)
    tokens = sum(answer_tokens(b) for b in batches)
    print(f"\n{shape.name} in bf16 on {torch.cuda.get_device_name()}: {len(batches)} batches of {shape.batch}")
    for name, run in variants(model, tokenizer, batches, "cuda").items():
        run()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for _ in range(repeats):
            run()
        torch.cuda.synchronize()
        rate = repeats * tokens / (time.perf_counter() - started)
        print(f"  {name:28s} {rate:10.0f} answer tokens/s, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="demo,1b", help="comma-separated: demo, 1b")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a party on this machine gets one)")
    parser.add_argument("--gpu", action="store_true", help="also the GLM-4-9B shape in bf16 on CUDA")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}; torch {torch.__version__}, {args.threads} thread(s)")
    for name in args.shapes.split(","):
        ratio = cpu_section(SHAPES[name.strip()], args.repeats if name != "1b" else max(1, args.repeats - 1))
        if name == "demo":
            print(f"  goal: fedtune / plain <= 0.5 on the demo shape: {'met' if ratio <= 0.5 else 'NOT met'}")
    if args.gpu:
        gpu_section(args.repeats)
    else:
        print("\nGPU section: not asked for (--gpu)")


if __name__ == "__main__":
    main()
