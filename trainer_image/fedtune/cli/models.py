"""Commands around models: `chat` with an adapter, `tiny-model`, `convert` a ChatGLM folder,
`export-adapter` back to ChatGLM's names."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from fedtune.spec import SpecError, load_job, resolve_path


def add_parsers(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], int]]:
    chat = sub.add_parser("chat", help="answer prompts with a fine-tuned adapter, loading it once")
    chat.add_argument("--model", type=Path,
                      help="the pretrained model folder (default: the job's input.pretrained_model)")
    chat.add_argument("--adapter", type=Path, help="a checkpoint-<fraction> folder (omit for the base model)")
    chat.add_argument("--prompt", action="append", help="answer this prompt and exit; repeatable "
                      "(default: read prompts from stdin, one a line, until it ends)")
    chat.add_argument("--job", type=Path, help="prompts are queries, put in this job's dataset.prompt_pattern")
    chat.add_argument("--instruction", help="the instruction before each query (default with --job: that of the "
                      "job's first trainset file; without --job, the reference's prompt_pattern is used)")
    chat.add_argument("--device", default="auto", help="auto (a GPU where there is one), cpu, cuda, cuda:N")
    chat.add_argument("--max-new-tokens", type=int, default=64)
    chat.add_argument("--temperature", type=float, default=0.0, help="0: greedy, the same answer every time")
    chat.add_argument("--top-p", type=float, default=1.0, help="sample from the most likely tokens whose "
                      "probabilities add up to this (with --temperature)")
    chat.add_argument("--seed", type=int, help="seed the sampling, for answers that can be repeated")

    tiny = sub.add_parser("tiny-model", help="build a tiny GLM-architecture model and tokenizer from QA data")
    tiny.add_argument("out", type=Path)
    tiny.add_argument("--data", required=True, type=Path, action="append", help="QA json file or folder (repeatable)")
    tiny.add_argument("--hidden-size", type=int, default=64)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--kind", choices=["glm", "glm4"], default="glm")
    tiny.add_argument("--pretrain-steps", type=int, default=200,
                      help="steps of language-model training on the data's texts (0: random weights)")
    tiny.add_argument("--vocab-size", type=int, help="the model's vocabulary width, at least the tokenizer's "
                      "(e.g. 130528, ChatGLM-6B's; default: the tokenizer's)")

    convert = sub.add_parser("convert", help="convert a ChatGLM2/3 or GLM-4 remote-code folder to a native GLM folder")
    convert.add_argument("src", type=Path, help="the folder with config.json (model_type chatglm) and its weights")
    convert.add_argument("dst", type=Path, help="the native folder to write (must not exist)")

    export = sub.add_parser("export-adapter", help="write a checkpoint trained on a converted ChatGLM model in "
                            "ChatGLM's own parameter names (for its inference code)")
    export.add_argument("checkpoint", type=Path, help="a checkpoint-<fraction> folder")
    export.add_argument("dst", type=Path, help="the folder to write (must not exist)")

    return {"chat": cmd_chat, "tiny-model": cmd_tiny_model, "convert": cmd_convert,
            "export-adapter": cmd_export_adapter}


def cmd_chat(args: argparse.Namespace) -> int:
    from fedtune.tools.chat import Chat, Sampling, prompt_template

    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p)
    job = load_job(args.job) if args.job else None
    base_dir = args.job.parent.resolve() if args.job else Path.cwd()
    model = args.model
    if model is None:
        if job is None:
            raise SpecError("--model: the pretrained model folder is needed (or --job, to take the job's)")
        model = resolve_path(job.spec.input.pretrained_model.path, base_dir)
    template = prompt_template(job.spec if job else None, base_dir, args.instruction)
    if args.seed is not None:
        import transformers

        transformers.set_seed(args.seed)
    chat = Chat(model, args.adapter, device=args.device)
    for prompt in args.prompt or _read_prompts(sys.stdin):
        for piece in chat.converse(template(prompt.replace("\\n", "\n")), sampling):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    return 0


def _read_prompts(stream: IO[str]) -> Iterator[str]:
    """Non-empty lines until the stream ends; on a terminal, with a `> ` before each."""
    interactive = stream.isatty()
    if interactive:
        print("one prompt a line; Ctrl-D ends", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = stream.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\n")


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from fedtune.model.tiny import build_tiny_model

    out = build_tiny_model(args.out, args.data, hidden_size=args.hidden_size, num_layers=args.layers, kind=args.kind,
                           pretrain_steps=args.pretrain_steps, vocab_size=args.vocab_size)
    print(out)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from fedtune.model.folders import is_chatglm6b, read_config

    _refuse_existing(args.dst)
    if is_chatglm6b(read_config(args.src)):
        from fedtune.model.chatglm6b.loading import convert as convert_folder
    else:
        from fedtune.model.chatglm import convert_folder
    print(convert_folder(args.src, args.dst))
    return 0


def cmd_export_adapter(args: argparse.Namespace) -> int:
    from fedtune.model.chatglm6b import export as chatglm6b

    _refuse_existing(args.dst)
    if chatglm6b.is_chatglm6b_checkpoint(args.checkpoint):
        export_adapter = chatglm6b.export_adapter
    else:
        from fedtune.model.chatglm import export_adapter
    print(export_adapter(args.checkpoint, args.dst))
    return 0


def _refuse_existing(dst: Path) -> None:
    if dst.exists():
        raise SpecError(f"{dst}: already exists; choose a new folder")
