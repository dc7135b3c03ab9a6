"""`fedtune chat`: loaded once, answers streamed as they are generated, the job's prompt, sampling options."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedtune import cli
from fedtune.model.adapters import apply_adapter, save_checkpoint
from fedtune.model.base import load_base_model
from fedtune.spec import Dataset, Peft
from fedtune.tools import chat as chat_module
from fedtune.tools.chat import Chat, Sampling, answer_ids
from fedtune.train.data import build_prompt
from support.jobs import write_job

PROMPT = "根据上句，写出下一句。：\n问：床前明月光\n答："
TOKENS = Sampling(max_new_tokens=12)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A LoRA checkpoint of random weights: the answers run for several tokens before an EOS."""
    model, _ = load_base_model(tiny_model)
    model, _ = apply_adapter(model, Peft.model_validate({"LORA": {"r": 4, "lora_dropout": 0.0}}))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return save_checkpoint(model, tmp_path_factory.mktemp("chat") / "checkpoint-1")


@pytest.fixture(scope="module")
def tiny_chat(tiny_model: Path, adapter: Path) -> Chat:
    return Chat(tiny_model, adapter, device="auto")


def greedy_text(chat: Chat, prompt: str, max_new_tokens: int) -> str:
    """The non-streamed greedy answer: every token first, then decoded at once."""
    ids = answer_ids(chat.model, chat.tokenizer, prompt, max_new_tokens)
    return chat.tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_the_answer_streams_as_it_is_generated_and_equals_the_greedy_answer(tiny_chat: Chat) -> None:
    forwards = []
    hook = tiny_chat.model.get_base_model().register_forward_hook(lambda *_: forwards.append(1))
    try:
        pieces = tiny_chat.stream(PROMPT, TOKENS)
        first = next(pieces)
        made_before_first = len(forwards)
        rest = list(pieces)
    finally:
        hook.remove()
    assert made_before_first < len(forwards)  # the first piece came out before the answer was finished
    assert rest, "the whole answer came in one piece"
    text = first + "".join(rest)
    assert len(text) >= 4 and text.rstrip() == greedy_text(tiny_chat, PROMPT, TOKENS.max_new_tokens)


def test_sampling_options(tiny_chat: Chat) -> None:
    greedy = tiny_chat.answer(PROMPT, TOKENS)
    # Top-p this small keeps only the most likely token: sampling then picks what greedy picks.
    assert tiny_chat.answer(PROMPT, Sampling(12, temperature=0.7, top_p=1e-6)) == greedy
    hot = Sampling(12, temperature=5.0)
    torch.manual_seed(11)
    first = tiny_chat.answer(PROMPT, hot)
    torch.manual_seed(11)
    assert tiny_chat.answer(PROMPT, hot) == first
    for bad, option in [({"temperature": -1}, "--temperature"), ({"top_p": 0}, "--top-p"),
                        ({"top_p": 1.5}, "--top-p"), ({"max_new_tokens": 0}, "--max-new-tokens")]:
        with pytest.raises(ValueError, match=option):
            Sampling(**bad)


def test_device_auto_and_a_device_this_machine_lacks(tiny_chat: Chat) -> None:
    assert tiny_chat.device == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="--device tpu7: not a device"):
        chat_module.resolve_device("tpu7")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: this machine has no CUDA device"):
            chat_module.resolve_device("cuda")


def test_two_prompts_in_one_process_load_the_model_once(monkeypatch, capsys, tiny_model: Path, adapter: Path,
                                                        tiny_chat: Chat) -> None:
    loads = []
    real = chat_module.load_base_model
    monkeypatch.setattr(chat_module, "load_base_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    second = "根据上句，写出下一句。：\n问：春眠不觉晓\n答："
    code = cli.main(["chat", "--model", str(tiny_model), "--adapter", str(adapter), "--prompt", PROMPT,
                     "--prompt", second, "--max-new-tokens", "12"])
    assert code == 0 and len(loads) == 1
    assert capsys.readouterr().out.splitlines() == [tiny_chat.answer(PROMPT, TOKENS), tiny_chat.answer(second, TOKENS)]


def test_stdin_queries_in_the_jobs_prompt_pattern(tmp_path: Path, tiny_model: Path, adapter: Path,
                                                  tiny_chat: Chat) -> None:
    dataset = Dataset(prompt_pattern="{}\n问：{}\n答：")
    job = write_job(tmp_path / "job", tiny_model, dataset={"prompt_pattern": dataset.prompt_pattern})
    instruction = "根据上句，写出下一句。"  # of the first trainset file: the assist_trainer's share of the poems
    queries = ("床前明月光", "春眠不觉晓")
    done = subprocess.run([sys.executable, "-m", "fedtune", "chat", "--job", str(job), "--adapter", str(adapter),
                           "--max-new-tokens", "12"],
                          input=f"{queries[0]}\n\n{queries[1]}\n", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("loaded ") == 1 and repr(instruction) in done.stderr
    expected = [tiny_chat.answer(build_prompt(instruction, query, dataset), TOKENS) for query in queries]
    assert done.stdout.splitlines() == expected


def test_an_instruction_alone_takes_the_reference_prompt_pattern(capsys, tiny_model: Path, adapter: Path,
                                                                 tiny_chat: Chat) -> None:
    code = cli.main(["chat", "--model", str(tiny_model), "--adapter", str(adapter), "--instruction",
                     "根据上句，写出下一句。", "--prompt", "床前明月光", "--max-new-tokens", "12"])
    assert code == 0
    prompt = build_prompt("根据上句，写出下一句。", "床前明月光", Dataset())  # "{}：\n问：{}\n答："
    assert prompt == PROMPT and capsys.readouterr().out.splitlines() == [tiny_chat.answer(PROMPT, TOKENS)]
