"""ChatGLM-6B's forward + backward: fedtune's implementation against upstream's code under transformers 4.33.

Both build the same shape from the same config with random weights, in float32 on the CPU (or, with
`--gpu` where CUDA exists, in bfloat16), and train the same weights (every `query_key_value`, standing in
for an adapter's) on the same batch: random token ids with `[gMASK] <sop>` after the prompt, the loss over
the answer: upstream's from `labels`, fedtune's as its Trainer computes it (`fedtune.model.loss`).
Each side runs in its own process (upstream's in the environment of `tests.support.upstream_env`), the
two alternating `--repeats` times; the best of each is kept.

- tokens/s: batch x sequence / the median step time (steps after a warm-up): on the CPU, in CPU seconds of
  one thread (time.process_time), so that a busy machine slows neither side more than the other;
- peak memory: on the CPU, the bytes of tensor storage alive at the worst moment of one step (weights
  included), counted as every op creates storages; on CUDA, torch.cuda.max_memory_allocated.

Goals: fedtune / upstream tokens/s >= 1.5, peak memory <= 0.8.

    python bench/chatglm6b.py                 # a 6B-like shape scaled down: hidden 1024, 4 layers
    python bench/chatglm6b.py --layers 2 --hidden 512 --repeats 1
    python bench/chatglm6b.py --estimate-memory   # the real 6.2 B shape, estimated on the meta device
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from gpu_finetune import PeakMemory, estimate_model_memory  # noqa: E402 (after the paths they need)

from tests.support import upstream_env  # noqa: E402


def config(args: argparse.Namespace) -> dict[str, Any]:
    return {"hidden_size": args.hidden, "num_layers": args.layers, "num_attention_heads": args.hidden // 128,
            "inner_hidden_size": 4 * args.hidden, "vocab_size": 130528, "max_sequence_length": 2048,
            "layernorm_epsilon": 1e-5, "position_encoding_2d": True, "bos_token_id": 130004, "eos_token_id": 130005,
            "mask_token_id": 130000, "gmask_token_id": 130001, "pad_token_id": 3, "use_cache": False}


# --- one side, in its own process -----------------------------------------------------------------


def build(side: str, settings: dict[str, Any], dtype: Any) -> Any:
    import torch

    if side == "fedtune":
        from fedtune.model.chatglm6b.configuration import ChatGLM6BConfig
        from fedtune.model.chatglm6b.modeling import ChatGLM6BForCausalLM

        return ChatGLM6BForCausalLM(ChatGLM6BConfig(**settings)).to(dtype)
    from transformers import AutoConfig, AutoModel

    upstream = AutoConfig.from_pretrained(upstream_env.reference_folder(), trust_remote_code=True, **settings)
    torch.manual_seed(0)
    return AutoModel.from_config(upstream, trust_remote_code=True, empty_init=False).to(dtype)


def batch(size: int, prompt: int, answer: int, device: str) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 120000, (size, prompt + 2 + answer), generator=generator)
    ids[:, prompt], ids[:, prompt + 1] = 130001, 130004
    labels = ids.clone()
    labels[:, : prompt + 1] = -100
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


def training_loss(side: str, model: Any) -> Any:
    """How each side trains: upstream's forward with labels; fedtune's Trainer loss (answer positions only,
    never the full logits: `fedtune.model.loss`)."""
    if side == "fedtune":
        from fedtune.model.loss import causal_lm_loss

        return lambda inputs: causal_lm_loss(model, inputs)
    return lambda inputs: model(**inputs).loss


def worker(side: str, args: argparse.Namespace) -> dict[str, float]:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)  # both sides alike, and CPU time is then the step's own
    device = "cuda" if args.gpu else "cpu"
    model = build(side, config(args), torch.bfloat16 if args.gpu else torch.float32).to(device).train()
    inputs = batch(args.batch, args.prompt, args.answer, device)
    for name, param in model.named_parameters():  # what fine-tuning trains: here the fused projections
        param.requires_grad = name.endswith("query_key_value.weight")
    loss = training_loss(side, model)

    def step() -> None:
        loss(inputs).backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    # CPU: seconds of this process's one thread, which other load on the machine does not inflate; CUDA: wall time
    clock = time.perf_counter if args.gpu else time.process_time
    times = []
    for _ in range(args.steps):
        if args.gpu:
            torch.cuda.synchronize()
        started = clock()
        step()
        if args.gpu:
            torch.cuda.synchronize()
        times.append(clock() - started)
    if args.gpu:
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = torch.cuda.max_memory_allocated()
    else:
        tracker = PeakMemory()
        for tensor in [*model.parameters(), *model.buffers(), *inputs.values()]:
            tracker.track(tensor)
        with tracker.mode:
            step()
        peak = tracker.peak
    tokens = inputs["input_ids"].numel()
    return {"tokens_per_s": tokens / statistics.median(times), "peak_bytes": peak}


# --- memory of the real shape, estimated ------------------------------------------------------------

SIX_B = {"hidden": 4096, "layers": 28}


def print_estimates(batch: int = 4, sequence: int = 200) -> None:
    """Peak memory of one LoRA step (r=8 on query_key_value) at ChatGLM-6B's real shape, bf16 base, built and
    run on PyTorch's meta device (gpu_finetune's estimate): no memory, no compute, no GPU."""
    from fedtune.model.chatglm6b.configuration import ChatGLM6BConfig
    from fedtune.model.chatglm6b.modeling import ChatGLM6BForCausalLM

    settings = config(argparse.Namespace(**SIX_B))
    print(f"ChatGLM-6B (hidden 4096, 28 layers, vocabulary 130528), LoRA r=8 on query_key_value, AdamW, fedtune's "
          f"loss, batch {batch} x {sequence} tokens, bf16 base; estimated on the meta device (tensors only)")
    for checkpointing in (False, True):
        weights, peak = estimate_model_memory(lambda: ChatGLM6BForCausalLM(ChatGLM6BConfig(**settings)),
                                              ["query_key_value"], batch, sequence, checkpointing)
        print(f"  gradient_checkpointing {str(checkpointing).lower():5}: weights {weights / 2**30:5.1f} GiB, "
              f"peak {peak / 2**30:5.1f} GiB")


# --- the comparison -------------------------------------------------------------------------------


def run_side(side: str, argv: list[str]) -> dict[str, float]:
    python = str(upstream_env.python()) if side == "upstream" else sys.executable
    env_path = {"PYTHONPATH": str(REPO / "trainer_image")} if side == "fedtune" else {}
    done = subprocess.run([python, __file__, "--worker", side, *argv], capture_output=True, text=True,
                          env={**os.environ, **env_path}, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"{side}: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--answer", type=int, default=62)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--gpu", action="store_true", help="bfloat16 on the CUDA device")
    parser.add_argument("--estimate-memory", action="store_true", help="only estimate the real shape's memory")
    parser.add_argument("--worker", choices=("fedtune", "upstream"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    if args.estimate_memory:
        print_estimates()
        return
    if not (upstream_env.reference_folder() / "modeling_chatglm.py").is_file():
        raise SystemExit(f"upstream's ChatGLM-6B code is not at {upstream_env.reference_folder()}")
    from common import machine

    argv = sys.argv[1:]
    results: dict[str, list[dict[str, float]]] = {"fedtune": [], "upstream": []}
    for _ in range(args.repeats):
        for side in results:
            results[side].append(run_side(side, argv))
    best = {side: {"tokens_per_s": max(r["tokens_per_s"] for r in runs),
                   "peak_bytes": min(r["peak_bytes"] for r in runs)} for side, runs in results.items()}
    print(f"machine: {machine()}")
    where = "bfloat16 on CUDA" if args.gpu else "float32 on the CPU"
    print(f"shape: hidden {args.hidden}, {args.layers} layers, {args.hidden // 128} heads, vocabulary 130528; batch "
          f"{args.batch} x {args.prompt + 2 + args.answer} tokens; {where}")
    for side, numbers in best.items():
        print(f"  {side:9} {numbers['tokens_per_s']:9.1f} tokens/s   peak {numbers['peak_bytes'] / 2**20:8.1f} MiB")
    speed = best["fedtune"]["tokens_per_s"] / best["upstream"]["tokens_per_s"]
    memory = best["fedtune"]["peak_bytes"] / best["upstream"]["peak_bytes"]
    print(f"tokens/s ratio fedtune/upstream {speed:.2f} (goal >= 1.5); peak memory ratio {memory:.2f} (goal <= 0.8)")


if __name__ == "__main__":
    main()
