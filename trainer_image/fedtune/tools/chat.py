"""`fedtune chat`: a base model and a fine-tuned adapter, loaded once, answering prompt after prompt.

The adapter folder says what it is: LoRA or P-tuning v2 (`adapter_config.json`), both loaded
with `PeftModel.from_pretrained`, or the P-tuning v2 prefix of a model that has its own prefix
encoder (`prefix_config.json`, ChatGLM), loaded as the reference's snippet does it: the
config's `pre_seq_len`, then `transformer.prefix_encoder`'s weights. The base is held as a job's
`dtype: auto` holds it: bfloat16 on GPUs that have it (else float16), float32 on the CPU.

Answers stream: each token is decoded as it is made, and its text goes out as soon as it is
whole (transformers' `TextStreamer` decides: complete characters, whole words). Decoding is
greedy unless a temperature is given, so the same adapter gives the same answer; with one,
tokens are sampled after transformers' temperature and top-p warpers, as `generate()` does.

Decoding is a small loop over the model's forward with a KV cache, not `generate()`: with
transformers 5 and peft 0.21, `generate()` on a prefix-tuned model silently drops the prefix
(transformers passes its own empty `cache`, which wins over the `past_key_values` peft
injects), so the answer would be the base model's. The loop puts the prefix into the cache
explicitly, exactly as a training forward pass does, and serves LoRA and the bare base the
same way. Checkpoints with their own modelling code (ChatGLM, the own-prefix path too) decode
through their own `generate()`, run in a thread whose streamer hands over each token as it comes.
"""

from __future__ import annotations

import inspect
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from queue import Queue
from typing import Any

import torch

from fedtune.model.adapters import (
    NATIVE_PREFIX_CONFIG,
    ModelError,
    apply_adapter,
    load_saved_adapter,
    native_prefix_encoder,
    saved_adapter_kind,
    use_chatglm_prefix,
)
from fedtune.model.base import load_base_model
from fedtune.model.chatglm6b import chat as chatglm6b_chat
from fedtune.model.folders import CONVERTED_TYPE as CHATGLM6B_TYPE
from fedtune.model.precision import FLOAT32, Precision, resolve_precision
from fedtune.spec import Dataset, JobSpec, Peft, PrefixTuning, PretrainedModel
from fedtune.train.data import build_prompt, dataset_files, read_instruction

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """How an answer is decoded: greedy at temperature 0, else sampled (top-p: the smallest set of
    tokens whose probabilities add up to `top_p`)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens {self.max_new_tokens}: must be at least 1")
        if self.temperature < 0:
            raise ValueError(f"--temperature {self.temperature:g}: must be 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p {self.top_p:g}: must be more than 0 and at most 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def resolve_device(device: str) -> str:
    """`auto`: the GPU where there is one, else the CPU; anything else must be a device this machine has."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device}: not a device (auto, cpu, cuda, cuda:N)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA device")
    return device


def load_for_chat(model_path: str | Path, adapter_path: str | Path | None, device: str = "cpu",
                  precision: Precision = FLOAT32) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode: the base alone, or with the adapter found in `adapter_path`."""
    if adapter_path is not None and (Path(adapter_path) / NATIVE_PREFIX_CONFIG).is_file():
        return _load_with_own_prefix(Path(model_path), Path(adapter_path), device, precision)
    model, tokenizer = load_base_model(model_path, device=device, precision=precision)
    if adapter_path is not None:
        saved_adapter_kind(adapter_path)  # a clear error for a folder that holds no adapter
        try:
            model = load_saved_adapter(model, adapter_path).to(device)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise ModelError(f"{adapter_path}: cannot load the adapter onto {model_path}: {err}") from None
        if _is_prefix_tuned(model):
            use_chatglm_prefix(model)
    return model.eval(), tokenizer


def _load_with_own_prefix(model_path: Path, adapter_path: Path, device: str, precision: Precision) -> tuple[Any, Any]:
    """The reference's inference snippet: the config's `pre_seq_len`, then the saved prefix encoder."""
    config_file = adapter_path / NATIVE_PREFIX_CONFIG
    try:
        settings = json.loads(config_file.read_text(encoding="utf-8"))
        overrides = {"pre_seq_len": int(settings["pre_seq_len"]),
                     "prefix_projection": bool(settings["prefix_projection"])}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(f"{config_file}: unreadable: {err}") from None
    model, tokenizer = load_base_model(model_path, device=device, precision=precision, config_overrides=overrides)
    encoder = native_prefix_encoder(model)
    if encoder is None:
        raise ModelError(f"{adapter_path} is a P-tuning v2 adapter for a model with its own prefix encoder "
                         f"(ChatGLM); {model_path} builds none")
    apply_adapter(model, Peft(PREFIX_TUNING=PrefixTuning(**overrides)), adapter_path)
    return model.eval(), tokenizer


def _is_prefix_tuned(model: Any) -> bool:
    config = getattr(model, "active_peft_config", None)
    return config is not None and str(getattr(config.peft_type, "value", config.peft_type)) == "PREFIX_TUNING"


def _stop_ids(tokenizer: Any, model: Any) -> set[int]:
    ids = model.config.eos_token_id if hasattr(model, "config") else None
    stop = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        stop.add(tokenizer.eos_token_id)
    return stop


def _uses_remote_code(model: Any) -> bool:
    return bool(getattr(getattr(model, "config", None), "auto_map", None))


_HELD_BACK = 12  # characters: upstream's longest replacement ("[[训练时间]]") fits


def _is_chatglm6b(model: Any) -> bool:
    """ChatGLM-6B answers are tidied as its upstream `chat()` tidies them."""
    return getattr(getattr(model, "config", None), "model_type", None) == CHATGLM6B_TYPE


def _next_cache(output: Any) -> Any:
    cache = getattr(output, "cache", None)  # transformers 5; `past_key_values` before
    return cache if cache is not None else output.past_key_values


def _chooser(sampling: Sampling) -> Callable[[torch.Tensor], int]:
    """The next token from the last position's logits: the most likely, or sampled as generate() samples."""
    if sampling.greedy:
        return lambda logits: int(logits.argmax())
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList([TemperatureLogitsWarper(sampling.temperature)])
    if sampling.top_p < 1:
        warpers.append(TopPLogitsWarper(sampling.top_p))

    def sample(logits: torch.Tensor) -> int:
        scores = warpers(None, logits[None].float())
        return int(torch.multinomial(torch.softmax(scores, dim=-1), 1))

    return sample


@torch.no_grad()
def _own_tokens(model: Any, input_ids: torch.Tensor, sampling: Sampling, stop: set[int]) -> Iterator[int]:
    """Decoding with a KV cache that starts with the P-tuning prefix, if any, one token per step.

    Positions continue after the prefix and the mask covers it, exactly as in a training forward.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # LoRA layers are inside
    cache, prefix_len = None, 0
    if _is_prefix_tuned(model):
        cache = model.get_prompt(batch_size=1)  # a DynamicCache already holding the prefix keys/values
        prefix_len = model.active_peft_config.num_virtual_tokens
    cache_arg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    choose = _chooser(sampling)
    mask = torch.ones(1, prefix_len + input_ids.shape[1], dtype=torch.long, device=input_ids.device)
    step_input = input_ids
    for _ in range(sampling.max_new_tokens):
        output = base(input_ids=step_input, attention_mask=mask, use_cache=True, **{cache_arg: cache})
        cache = _next_cache(output)
        token = choose(output.logits[0, -1])
        if token in stop:
            return
        yield token
        step_input = torch.tensor([[token]], device=input_ids.device)
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)


class _TokenQueue:
    """A `generate()` streamer that hands the new tokens to another thread as they come."""

    def __init__(self) -> None:
        self.tokens: Queue[int | None] = Queue()
        self._prompt = True

    def put(self, value: torch.Tensor) -> None:
        if self._prompt:  # generate() puts the prompt first
            self._prompt = False
            return
        for token in value.reshape(-1).tolist():
            self.tokens.put(int(token))

    def end(self) -> None:
        self.tokens.put(None)


def _generated_tokens(model: Any, tokenizer: Any, input_ids: torch.Tensor, sampling: Sampling,
                      stop: set[int]) -> Iterator[int]:
    """A checkpoint with its own modelling code decodes through its own `generate`, streamed from a thread."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    options: dict[str, Any] = {"do_sample": not sampling.greedy}
    if not sampling.greedy:
        options.update(temperature=sampling.temperature, top_p=sampling.top_p)
    streamer, failed = _TokenQueue(), []

    def run() -> None:
        try:
            with torch.no_grad():
                model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                               max_new_tokens=sampling.max_new_tokens, eos_token_id=sorted(stop) or None,
                               pad_token_id=pad, streamer=streamer, **options)
        except Exception as err:  # raised again below, in the caller's thread
            failed.append(err)
        finally:
            streamer.end()

    thread = threading.Thread(target=run, name="generate", daemon=True)
    thread.start()
    ended = False
    for token in iter(streamer.tokens.get, None):
        ended = ended or token in stop  # generate() may pad after the end
        if not ended:
            yield token
    thread.join()
    if failed:
        raise failed[0]


def _tokens(model: Any, tokenizer: Any, prompt: str, sampling: Sampling, *, stop_at_eos: bool = True) -> Iterator[int]:
    """The answer's token ids as they are made (the prompt encoded as in training: with its special tokens)."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([tokenizer(prompt, add_special_tokens=True)["input_ids"]], device=device)
    stop = _stop_ids(tokenizer, model) if stop_at_eos else set()
    if _uses_remote_code(model) and not _is_prefix_tuned(model):
        return _generated_tokens(model, tokenizer, input_ids, sampling, stop)
    return _own_tokens(model, input_ids, sampling, stop)


def answer_ids(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 64, *,
               stop_at_eos: bool = True) -> list[int]:
    """The greedy answer's token ids, all at once."""
    return list(_tokens(model, tokenizer, prompt, Sampling(max_new_tokens), stop_at_eos=stop_at_eos))


def _texts(tokenizer: Any, tokens: Iterable[int]) -> Iterator[str]:
    """Text as soon as it is whole, token by token: transformers' TextStreamer, collected instead of printed."""
    from transformers import TextStreamer

    ready: list[str] = []

    class Collect(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                ready.append(text)

    streamer = Collect(tokenizer, skip_special_tokens=True)
    for token in tokens:
        streamer.put(torch.tensor([token]))
        yield from ready
        ready.clear()
    streamer.end()
    yield from ready


def _tidied(chunks: Iterable[str]) -> Iterator[str]:
    """The text as upstream's ChatGLM-6B `chat()` tidies it, streamed: a character's tidying depends on its
    neighbours, so the last few wait for the next piece."""
    text, sent = "", 0
    for chunk in chunks:
        text += chunk
        ready = chatglm6b_chat.process_response(text)[:-_HELD_BACK]
        if len(ready) > sent:
            yield ready[sent:]
            sent = len(ready)
    rest = chatglm6b_chat.process_response(text)[sent:]
    if rest:
        yield rest


def _without_leading_space(chunks: Iterable[str]) -> Iterator[str]:
    started = False
    for chunk in chunks:
        if not started:
            chunk = chunk.lstrip()
            started = bool(chunk)
        if chunk:
            yield chunk


class Chat:
    """A base model (and adapter) loaded once, answering prompt after prompt."""

    def __init__(self, model_path: str | Path, adapter_path: str | Path | None = None, *, device: str = "auto") -> None:
        started = time.perf_counter()
        self.device = resolve_device(device)
        # As a job's `dtype: auto`: bfloat16 on GPUs that have it, else float16; float32 on the CPU.
        precision = resolve_precision(PretrainedModel(path=str(model_path)), self.device)
        self.model, self.tokenizer = load_for_chat(model_path, adapter_path, self.device, precision)
        self.history: list[tuple[str, str]] = []  # (query, answer) of `converse`
        with_adapter = f" with {adapter_path}" if adapter_path is not None else ""
        log.info("loaded %s%s on %s (%s) in %.1f s", model_path, with_adapter, self.device, precision.describe(),
                 time.perf_counter() - started)

    def stream(self, prompt: str, sampling: Sampling = Sampling()) -> Iterator[str]:
        """The answer to `prompt` (the full prompt text), piece by piece as it is generated (ChatGLM-6B's tidied
        as its upstream `chat()` tidies it)."""
        pieces = _without_leading_space(_texts(self.tokenizer, _tokens(self.model, self.tokenizer, prompt, sampling)))
        return _tidied(pieces) if _is_chatglm6b(self.model) else pieces

    def converse(self, query: str, sampling: Sampling = Sampling()) -> Iterator[str]:
        """The answer to the next query of a conversation: ChatGLM-6B sees the earlier rounds, as its upstream
        `chat()` puts them (`[Round i]` ...); other models see the query alone."""
        if not _is_chatglm6b(self.model):
            yield from self.stream(query, sampling)
            return
        pieces: list[str] = []
        for piece in self.stream(chatglm6b_chat.prompt(query, self.history), sampling):
            pieces.append(piece)
            yield piece
        self.history.append((query, "".join(pieces)))

    def answer(self, prompt: str, sampling: Sampling = Sampling()) -> str:
        return "".join(self.stream(prompt, sampling)).rstrip()


def prompt_template(spec: JobSpec | None, base_dir: Path, instruction: str | None) -> Callable[[str], str]:
    """What turns a query into the prompt the job trained on: `dataset.prompt_pattern.format(instruction, query)`.

    With neither a job nor an instruction, prompts are taken as they are. Without an instruction,
    the job's comes from its first trainset file (that of the first party that has one).
    """
    if spec is None and instruction is None:
        return lambda prompt: prompt
    dataset = spec.dataset if spec is not None else Dataset()
    if instruction is None:
        assert spec is not None
        instruction = _job_instruction(spec, base_dir)
    log.info("prompts are queries: dataset.prompt_pattern %r with instruction %r", dataset.prompt_pattern, instruction)
    return lambda query: build_prompt(instruction, query, dataset)


def _job_instruction(spec: JobSpec, base_dir: Path) -> str:
    entries = next((spec.trainset(p) for p in spec.parties if p.remote is None and spec.trainset(p)), [])
    if not entries:
        raise ValueError("--instruction: the job has no local trainset to take the instruction from; give one")
    return read_instruction(dataset_files(entries, base_dir)[0])
