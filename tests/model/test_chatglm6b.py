"""ChatGLM-6B (v1): fedtune's implementation against upstream's own code under transformers 4.33.

The upstream side runs in its own environment (`tests.support.upstream_env`, made once and cached) on a
small random checkpoint it builds from the reference's demo folder (`tests.support.upstream_chatglm6b`):
the token ids, float32 logits (within 1e-4) and greedy continuations must be the same, for the base model,
with a LoRA on `query_key_value`, and with upstream's own P-tuning v2 prefix encoder.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedtune.model.folders import ModelError
from support import upstream_env

REFERENCE = upstream_env.reference_folder()
TOLERANCE = 1e-4
needs_reference = pytest.mark.skipif(not (REFERENCE / "modeling_chatglm.py").is_file(),
                                     reason=f"upstream's ChatGLM-6B folder is not at {REFERENCE}")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What upstream's code computed: the checkpoint folders and record.pt."""
    if not (REFERENCE / "modeling_chatglm.py").is_file():
        pytest.skip(f"upstream's ChatGLM-6B folder is not at {REFERENCE}")
    out = tmp_path_factory.mktemp("upstream") / "out"
    script = Path(__file__).resolve().parents[1] / "support" / "upstream_chatglm6b.py"
    done = subprocess.run([str(upstream_env.python()), str(script), str(REFERENCE), str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def record(upstream: Path) -> dict:
    return torch.load(upstream / "record.pt", weights_only=False)


def load(folder: Path, overrides: dict | None = None) -> tuple:
    from fedtune.model.chatglm6b import loading

    return loading.load_model(folder, torch.float32, overrides), loading.load_tokenizer(folder)


def compare(model: torch.nn.Module, tokenizer, record: dict, name: str) -> None:
    from support.upstream_chatglm6b import NEW_TOKENS, PROMPTS

    single = tokenizer([PROMPTS[0]], return_tensors="pt")
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**single).logits
        batch_logits = model(**batch).logits
        greedy = model.generate(**single, do_sample=False, max_new_tokens=NEW_TOKENS)
        batch_greedy = model.generate(**batch, do_sample=False, max_new_tokens=NEW_TOKENS)
    torch.testing.assert_close(logits, record[f"{name}.logits"], atol=TOLERANCE, rtol=0)
    real = batch["attention_mask"].bool()  # upstream's padding rows are garbage by design: compare real tokens
    torch.testing.assert_close(batch_logits[real], record[f"{name}.batch_logits"][real], atol=TOLERANCE, rtol=0)
    assert greedy.tolist() == record[f"{name}.greedy"].tolist()
    assert batch_greedy.tolist() == record[f"{name}.batch_greedy"].tolist()


@needs_reference
def test_tokenizer_gives_upstreams_ids(upstream: Path, record: dict) -> None:
    from support.upstream_chatglm6b import PROMPTS, TEXTS

    _, tokenizer = load(upstream / "model")
    assert [tokenizer(t)["input_ids"] for t in TEXTS] == record["ids"]
    assert [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS] == record["plain_ids"]
    assert [tokenizer.decode(tokenizer(t)["input_ids"]) for t in TEXTS] == record["decoded"]
    assert tokenizer(PROMPTS, padding=True)["input_ids"] == record["batch_ids"]


@needs_reference
def test_base_model_matches_upstream(upstream: Path, record: dict) -> None:
    model, tokenizer = load(upstream / "model")
    compare(model, tokenizer, record, "base")
    model.config._attn_implementation = "eager"
    compare(model, tokenizer, record, "base")


@needs_reference
def test_upstream_lora_matches(upstream: Path, record: dict) -> None:
    from peft import PeftModel

    model, tokenizer = load(upstream / "model")
    compare(PeftModel.from_pretrained(model, upstream / "lora").eval(), tokenizer, record, "lora")


@needs_reference
def test_upstream_prefix_encoder_matches(upstream: Path, record: dict) -> None:
    from support.upstream_chatglm6b import PRE_SEQ_LEN

    settings = json.loads((upstream / "prefix" / "prefix_config.json").read_text())
    model, tokenizer = load(upstream / "model", settings)
    state = torch.load(upstream / "prefix" / "pytorch_model.bin", weights_only=True)
    _, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and model.transformer.prefix_encoder.embedding.num_embeddings == PRE_SEQ_LEN
    compare(model.eval(), tokenizer, record, "prefix")


@needs_reference
def test_convert_writes_a_folder_the_auto_classes_load(upstream: Path, record: dict, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedtune.model.chatglm6b import loading

    out = loading.convert(upstream / "model", tmp_path / "native")
    assert json.loads((out / "config.json").read_text())["model_type"] == "chatglm6b"
    assert not list(out.glob("*.py"))  # no remote code
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    compare(model, AutoTokenizer.from_pretrained(out), record, "base")


def test_importing_fedtune_imports_no_torch() -> None:
    code = "import sys, fedtune, fedtune.spec; print('torch' in sys.modules, 'transformers' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]


@needs_reference
@pytest.mark.parametrize("change, expected", [
    ({"quantization_bit": 4}, "quantization_bit 4"),
    ({"position_encoding_2d": False}, "position_encoding_2d False"),
    ({"inner_hidden_size": None}, "without inner_hidden_size"),
])
def test_bad_configs_are_refused_naming_the_field(tmp_path: Path, change: dict, expected: str) -> None:
    from fedtune.model import folders

    config = json.loads((REFERENCE / "config.json").read_text())
    config.update({k: v for k, v in change.items() if v is not None})
    for key in [k for k, v in change.items() if v is None]:
        del config[key]
    (tmp_path / "ice_text.model").write_bytes((REFERENCE / "ice_text.model").read_bytes())
    with pytest.raises(ModelError, match=expected) as err:
        folders.check_chatglm6b(config, tmp_path)
    assert "config.json" in str(err.value)


def test_another_tokenizer_file_is_refused(tmp_path: Path) -> None:
    from fedtune.model import folders

    with pytest.raises(ModelError, match=r"no ice_text\.model"):
        folders.check_chatglm6b_tokenizer(tmp_path)
    (tmp_path / "ice_text.model").write_bytes(b"\x0a\x05hello")
    with pytest.raises(ModelError, match=r"not ChatGLM-6B's ice_text\.model"):
        folders.check_chatglm6b_tokenizer(tmp_path)


def test_prefix_checkpoint_of_another_length_is_refused(tmp_path: Path) -> None:
    from fedtune.model import folders

    (tmp_path / "prefix_config.json").write_text(json.dumps({"pre_seq_len": 8, "prefix_projection": False}))
    folders.check_chatglm6b_prefix(tmp_path, 8, False)
    with pytest.raises(ModelError, match=r"pre_seq_len 8 differs from peft\.PREFIX_TUNING\.pre_seq_len 4"):
        folders.check_chatglm6b_prefix(tmp_path, 4, False)


# --- the reference's path: a job on a ChatGLM-6B folder, its checkpoints in the reference's snippet ----------


def snippet_answer(mode: str, model: Path, checkpoint: Path, prompt: str, new_tokens: int) -> str:
    script = Path(__file__).resolve().parents[1] / "support" / "upstream_snippet.py"
    done = subprocess.run([str(upstream_env.python()), str(script), mode, str(model), str(checkpoint), prompt,
                           str(new_tokens)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_reference
@pytest.mark.slow
@pytest.mark.parametrize("peft, mode", [("LORA", "lora"), ("PTUNING", "ptuning")])
def test_a_trained_checkpoint_answers_alike_in_the_reference_snippet(upstream: Path, tmp_path: Path, peft: str,
                                                                    mode: str) -> None:
    """A 3-party job on upstream's checkpoint; `fedtune export-adapter`; the snippet's greedy `model.chat()`
    under transformers 4.33 answers as fedtune's chat does on the same checkpoint."""
    from fedtune.tools.chat import Chat, Sampling
    from support import jobs

    job = jobs.write_job(tmp_path / "job", upstream / "model", sizes=(8, 8, 8), epochs=1,
                         peft=getattr(jobs, peft))
    done = jobs.run_cli("run", str(job), "--output", str(tmp_path / "out"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    checkpoint = tmp_path / "out" / "node-1" / "checkpoint-1"
    exported = tmp_path / "exported"
    done = jobs.run_cli("export-adapter", str(checkpoint), str(exported))
    assert done.returncode == 0, done.stderr[-2000:]
    prompt, new_tokens = "根据提示词，写一首藏头诗。\n问：东南西北\n答：", 12
    ours = Chat(upstream / "model", checkpoint, device="cpu").answer(prompt, Sampling(max_new_tokens=new_tokens))
    assert ours
    assert snippet_answer(mode, upstream / "model", exported, prompt, new_tokens) == ours


def test_chat_prompt_and_response_as_upstream() -> None:
    from fedtune.model.chatglm6b.chat import process_response, prompt

    assert prompt("你好") == "你好"
    assert prompt("再见", [("你好", "你好！")]) == "[Round 0]\n问：你好\n答：你好！\n[Round 1]\n问：再见\n答："
    assert process_response("  好,很好!ok, yes  ") == "好，很好！ok, yes"


def tiny_chatglm6b(**overrides: object) -> torch.nn.Module:
    from fedtune.model.chatglm6b.configuration import ChatGLM6BConfig
    from fedtune.model.chatglm6b.modeling import ChatGLM6BForCausalLM

    torch.manual_seed(0)
    settings = {"vocab_size": 130528, "hidden_size": 32, "num_layers": 2, "num_attention_heads": 4,
                "inner_hidden_size": 64, **overrides}
    return ChatGLM6BForCausalLM(ChatGLM6BConfig(**settings))


def sample_batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[3, 3, 70, 71, 72, 130001, 130004, 80, 81], [60, 61, 62, 63, 64, 130001, 130004, 90, 91]])
    labels = ids.clone()
    labels[:, :7] = -100
    return {"input_ids": ids, "attention_mask": (ids != 3).long(), "labels": labels}


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    grads = []
    for checkpointing in (False, True):
        model = tiny_chatglm6b().train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(**sample_batch()).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_follows_float32(dtype: torch.dtype) -> None:
    model = tiny_chatglm6b().eval()
    batch = {k: v for k, v in sample_batch().items() if k != "labels"}
    with torch.no_grad():
        exact = model(**batch).logits
        half = model.to(dtype)(**batch).logits.float()
    real = batch["attention_mask"].bool()
    assert torch.isfinite(half).all()
    assert (half[real] - exact[real]).abs().max() < 0.1 * exact[real].abs().max()


def test_peft_prefix_tuning_is_the_own_prefix_encoder() -> None:
    """peft's prefix tuning (its prefix handed over as a cache, the mask extended over it) computes what the
    model's own encoder (upstream's P-tuning v2, checked against upstream above) computes from the same weights."""
    from peft import PrefixTuningConfig, get_peft_model

    batch = {k: v for k, v in sample_batch().items() if k != "labels"}
    peft_model = get_peft_model(tiny_chatglm6b(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with torch.no_grad():
        for param in peft_model.prompt_encoder.parameters():
            param.normal_(std=0.5)
        through_peft = peft_model.eval()(**batch).logits
        own = tiny_chatglm6b(pre_seq_len=3).eval()
        own.load_state_dict(peft_model.get_base_model().state_dict(), strict=False)
        own.transformer.prefix_encoder.embedding.weight.copy_(peft_model.prompt_encoder["default"].embedding.weight)
        through_own = own(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(through_peft[real], through_own[real], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(through_own[real], peft_model.get_base_model()(**batch).logits[real])


@needs_reference
@pytest.mark.parametrize("break_it, field, message", [
    ("prefix", "spec.input.adapter_model.path", "pre_seq_len 8 differs from peft.PREFIX_TUNING.pre_seq_len 4"),
    ("tokenizer", "spec.input.pretrained_model.path", "not ChatGLM-6B's ice_text.model"),
    ("quantised", "spec.input.pretrained_model.path", "quantization_bit 4"),
])
def test_bad_chatglm6b_input_is_refused_before_anything_starts(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                break_it: str, field: str, message: str) -> None:
    """`fedtune validate` exits 2, one line naming the job, the field and what is wrong."""
    import shutil

    from fedtune.cli import main
    from support import jobs

    model = tmp_path / "model"
    shutil.copytree(REFERENCE, model)
    overrides: dict = {}
    if break_it == "prefix":
        adapter = tmp_path / "checkpoint"
        adapter.mkdir()
        (adapter / "prefix_config.json").write_text(json.dumps({"pre_seq_len": 8, "prefix_projection": False}))
        overrides = {"input": {"pretrained_model": {"path": str(model)}, "adapter_model": {"path": str(adapter)}}}
    elif break_it == "tokenizer":
        (model / "ice_text.model").chmod(0o644)
        (model / "ice_text.model").write_bytes(b"\x0a\x05hello")
    else:
        (model / "config.json").chmod(0o644)
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "quantization_bit": 4}))
    job = jobs.write_job(tmp_path / "job", model, peft=jobs.PTUNING, **overrides)
    assert main(["validate", str(job)]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    first = err.splitlines()[0]  # the error in one line (a hint may follow)
    assert str(job) in first and field in first and message in first, err


def test_streamed_answers_are_tidied_as_a_whole() -> None:
    from fedtune.model.chatglm6b.chat import process_response
    from fedtune.tools.chat import _tidied

    text = "好,很好!ok, yes:是;[[训练时间]]的?  末尾,"
    for size in (1, 2, 3, 5, 40):
        chunks = [text[i:i + size] for i in range(0, len(text), size)]
        assert "".join(_tidied(chunks)) == process_response(text)


@needs_reference
def test_chat_with_chatglm6b_carries_the_conversation() -> None:
    from fedtune.model.chatglm6b.chat import prompt
    from fedtune.tools.chat import Chat, Sampling

    chat = Chat(REFERENCE, device="cpu")
    sampling = Sampling(max_new_tokens=4)
    first = "".join(chat.converse("你好", sampling))
    second = "".join(chat.converse("再说一遍", sampling))
    assert chat.history == [("你好", first), ("再说一遍", second)]
    assert second == chat.answer(prompt("再说一遍", [("你好", first)]), sampling)
