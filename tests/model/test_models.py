"""Base models from local folders, LoRA and P-tuning v2 adapters, adapter state, atomic checkpoints, chat."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from fedtune.model.adapters import (
    ModelError,
    adapter_schema,
    adapter_state,
    apply_adapter,
    load_adapter_state,
    save_checkpoint,
    saved_adapter_kind,
)
from fedtune.model.base import load_base_model
from fedtune.model.tiny import build_tiny_model
from fedtune.spec import Peft
from fedtune.tools.chat import Chat, Sampling, answer_ids, load_for_chat
from support.jobs import POEMS

PROMPT = "根据上句，写出下一句。：\n问：床前明月光\n答："
LORA = {"LORA": {"r": 4, "lora_dropout": 0.0}}
PTUNING = {"PREFIX_TUNING": {"pre_seq_len": 4}}
PTUNING_PROJECTED = {"PREFIX_TUNING": {"pre_seq_len": 4, "prefix_projection": True, "prefix_hidden_size": 16}}


def adapted(model_dir: Path, peft: dict, adapter: Path | None = None, *, randomize: bool = False):
    model, tokenizer = load_base_model(model_dir)
    peft_model, note = apply_adapter(model, Peft.model_validate(peft), adapter)
    if randomize:  # LoRA starts as a no-op (B = 0): make the adapter matter
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in peft_model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return peft_model, tokenizer, note


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- loading -------------------------------------------------------------------------------


def test_missing_or_unreadable_model_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=rf"{tmp_path}/absent: pretrained model folder not found"):
        load_base_model(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"empty: no config.json"):
        load_base_model(tmp_path / "empty")


POD_UID = 10001  # the user the operator's pods run as


def error_as_pod_user(call: Callable[[], object]) -> str:
    """The message of the error `call()` raises when run by the pods' user: in a forked child that gives
    up root (which may read anything); as this process's own user when the tests do not run as root."""
    if os.geteuid() != 0:
        try:
            call()
        except Exception as err:  # the message is what is compared
            return str(err)
        return ""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no torch work happens before the checks fail
        os.close(read)
        message = ""
        try:
            os.setgroups([])
            os.setgid(POD_UID)
            os.setuid(POD_UID)
            call()
        except BaseException as err:
            message = str(err)
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    return message


@pytest.fixture
def shared_model(tiny_model: Path) -> Iterator[Path]:
    """A copy of the tiny model where any user can reach it (pytest's own folders are root's alone)."""
    top = Path(tempfile.mkdtemp(prefix="fedtune-shared-"))
    top.chmod(0o755)
    try:
        yield Path(shutil.copytree(tiny_model, top / "tiny-glm"))
    finally:
        shutil.rmtree(top)


def test_a_model_is_written_readable_by_every_user(tiny_model: Path) -> None:
    assert stat.S_IMODE(tiny_model.stat().st_mode) == 0o755
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in tiny_model.iterdir()} == {
        p.name: "0o644" for p in tiny_model.iterdir()}


def test_a_weights_file_the_user_cannot_read_is_named_as_permission_denied(shared_model: Path) -> None:
    weights = shared_model / "model.safetensors"
    weights.chmod(0o600)  # as a model written by root with a private umask: the pods' user may not read it
    message = error_as_pod_user(lambda: load_base_model(shared_model))
    # Not the "No such file or directory" safetensors says for a file it may not open.
    assert f"{weights}: permission denied" in message and "(mode 0600)" in message, message
    # An adapter folder (input.adapter_model) is checked alike.
    assert error_as_pod_user(lambda: saved_adapter_kind(shared_model)) == message
    weights.chmod(0o644)
    assert error_as_pod_user(lambda: saved_adapter_kind(shared_model)).endswith("no adapter_config.json)")
    shared_model.chmod(0o700)  # a folder the user cannot open: not "not found" either
    message = error_as_pod_user(lambda: load_base_model(shared_model))
    assert message.startswith(f"{shared_model}: permission denied") and "cannot open the folder" in message, message


# --- LoRA ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["glm", "glm4"])
def test_lora_query_key_value_maps_onto_native_glm_projections(tmp_path: Path, tiny_model: Path, kind: str) -> None:
    model_dir = tiny_model if kind == "glm" else build_tiny_model(tmp_path / "glm4", [POEMS], hidden_size=32,
                                                                  kind="glm4")
    peft_model, _, note = adapted(model_dir, {"LORA": {"target_modules": ["query_key_value"]}})
    assert "query_key_value -> q_proj, k_proj, v_proj" in note
    assert set(peft_model.peft_config["default"].target_modules) == {"q_proj", "k_proj", "v_proj"}
    names = list(adapter_state(peft_model))
    layers = peft_model.config.num_hidden_layers
    assert len(names) == layers * 3 * 2  # A and B for q, k, v in every layer
    assert all(".lora_A." in n or ".lora_B." in n for n in names)
    assert {n.split(".self_attn.")[1].split(".")[0] for n in names} == {"q_proj", "k_proj", "v_proj"}


def test_lora_native_names_pass_through_and_unknown_ones_are_refused(tiny_model: Path) -> None:
    peft_model, _, note = adapted(tiny_model, {"LORA": {"target_modules": ["o_proj", "dense_4h_to_h"]}})
    assert set(peft_model.peft_config["default"].target_modules) == {"o_proj", "down_proj"}
    assert "dense_4h_to_h -> down_proj" in note
    with pytest.raises(ModelError, match=r"peft.LORA.target_modules: `attn_qkv` is not a module .*q_proj"):
        adapted(tiny_model, {"LORA": {"target_modules": ["attn_qkv"]}})
    with pytest.raises(ModelError, match=r"peft.LORA.use_magic: not an option of peft's LoraConfig"):
        adapted(tiny_model, {"LORA": {"use_magic": True}})


def test_lora_extra_keys_pass_through_to_peft(tiny_model: Path) -> None:
    peft_model, _, _ = adapted(tiny_model, {"LORA": {"use_rslora": True, "r": 2}})
    config = peft_model.peft_config["default"]
    assert config.use_rslora is True and config.r == 2


# --- P-tuning v2 ---------------------------------------------------------------------------


@pytest.mark.parametrize("peft", [PTUNING, PTUNING_PROJECTED])
def test_ptuning_trains_only_the_prefix(tiny_model: Path, peft: dict) -> None:
    peft_model, tokenizer, note = adapted(tiny_model, peft)
    assert "P-tuning v2: 4 prefix tokens in each of 2 layers" in note
    state = adapter_state(peft_model)
    assert state and all(name.startswith("prompt_encoder.default.") for name in state)
    assert not any("lm_head" in name for name in state)  # the reference's defect: lm_head trained too
    config = peft_model.get_base_model().config
    kv_width = config.num_key_value_heads * config.head_dim
    if "prefix_projection" not in peft["PREFIX_TUNING"]:
        assert dict(adapter_schema(peft_model)) == {
            "prompt_encoder.default.embedding.weight": (4, config.num_hidden_layers * 2 * kv_width)}
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
    with_grad = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert with_grad == set(state) and all(peft_model.get_parameter(n).grad.abs().sum() > 0 for n in with_grad)


def greedy_by_full_forward(peft_model, tokenizer, prompt: str, steps: int) -> list[int]:
    """The training forward pass, repeated: what generation must agree with."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(steps):
            logits = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, start:].tolist()


@pytest.mark.parametrize("peft", [LORA, PTUNING, PTUNING_PROJECTED])
def test_chat_from_a_saved_checkpoint_decodes_like_the_trained_model(tmp_path: Path, tiny_model: Path,
                                                                     peft: dict) -> None:
    peft_model, tokenizer, _ = adapted(tiny_model, peft, randomize=True)
    save_checkpoint(peft_model, tmp_path / "checkpoint-1")
    expected = greedy_by_full_forward(peft_model.eval(), tokenizer, PROMPT, 12)
    model, tok = load_for_chat(tiny_model, tmp_path / "checkpoint-1")
    got = answer_ids(model, tok, PROMPT, 12, stop_at_eos=False)  # a random adapter may well say EOS at once
    assert got == expected
    base_only = answer_ids(*load_for_chat(tiny_model, None), PROMPT, 12, stop_at_eos=False)
    assert got != base_only  # the adapter (the P-tuning prefix too) is really used
    stop = got.index(tok.eos_token_id) if tok.eos_token_id in got else len(got)
    text = tok.decode(got[:stop], skip_special_tokens=True).strip()
    assert Chat(tiny_model, tmp_path / "checkpoint-1", device="cpu").answer(PROMPT, Sampling(12)) == text


# --- adapter state -------------------------------------------------------------------------


def test_load_adapter_state_is_strict_and_in_place(tiny_model: Path) -> None:
    peft_model, _, _ = adapted(tiny_model, LORA)
    params_before = [p for p in peft_model.parameters() if p.requires_grad]
    state = adapter_state(peft_model)
    first = next(iter(state))
    doubled = {k: v + 1 for k, v in state.items()}
    load_adapter_state(peft_model, doubled)
    assert same_state(adapter_state(peft_model), doubled)
    assert [p for p in peft_model.parameters() if p.requires_grad] == params_before  # same tensors: optimizer-safe

    with pytest.raises(ModelError, match=rf"`{first}` is missing"):
        load_adapter_state(peft_model, {k: v for k, v in state.items() if k != first})
    with pytest.raises(ModelError, match=r"`stray.weight` is not part of this model's adapter"):
        load_adapter_state(peft_model, {**state, "stray.weight": torch.zeros(1)})
    wrong = dict(state)
    wrong[first] = torch.zeros(state[first].shape[0] + 1, state[first].shape[1])
    with pytest.raises(ModelError, match=rf"`{first}` has shape"):
        load_adapter_state(peft_model, wrong)
    assert same_state(adapter_state(peft_model), doubled)  # a refused state changes nothing


def test_adapter_state_is_a_detached_float32_copy(tiny_model: Path) -> None:
    peft_model, _, _ = adapted(tiny_model, LORA)
    state = adapter_state(peft_model)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" and not v.requires_grad for v in state.values())
    with torch.no_grad():
        next(p for p in peft_model.parameters() if p.requires_grad).add_(1.0)
    assert not same_state(state, adapter_state(peft_model))


# --- checkpoints ---------------------------------------------------------------------------


def test_lora_checkpoint_loads_with_peft_from_pretrained(tmp_path: Path, tiny_model: Path) -> None:
    from peft import PeftModel

    peft_model, _, _ = adapted(tiny_model, LORA, randomize=True)
    dest = save_checkpoint(peft_model, tmp_path / "out" / "checkpoint-0.5")
    loaded = PeftModel.from_pretrained(load_base_model(tiny_model)[0], str(dest))
    loaded_state = {n: p.detach() for n, p in loaded.named_parameters() if "lora_" in n}
    assert same_state(adapter_state(peft_model), loaded_state)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint-0.5"]  # no temporary leftovers


def test_checkpoint_replacement_is_whole_or_nothing(tmp_path: Path, tiny_model: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    peft_model, _, _ = adapted(tiny_model, LORA, randomize=True)
    dest = save_checkpoint(peft_model, tmp_path / "checkpoint-1")
    before = {p.name: p.read_bytes() for p in dest.iterdir()}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(peft_model), "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(peft_model, dest)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]


@pytest.mark.parametrize("peft", [LORA, PTUNING, PTUNING_PROJECTED])
def test_training_continues_from_a_saved_adapter(tmp_path: Path, tiny_model: Path, peft: dict) -> None:
    peft_model, _, _ = adapted(tiny_model, peft, randomize=True)
    save_checkpoint(peft_model, tmp_path / "adapter")
    continued, _, note = adapted(tiny_model, peft, tmp_path / "adapter")
    assert f"continuing from {tmp_path / 'adapter'}" in note
    assert same_state(adapter_state(continued), adapter_state(peft_model))
    assert all(p.requires_grad for n, p in continued.named_parameters() if n in adapter_state(peft_model))


def test_ptuning_checkpoint_keeps_the_reference_layout(tmp_path: Path, tiny_model: Path) -> None:
    peft_model, _, _ = adapted(tiny_model, PTUNING_PROJECTED, randomize=True)
    dest = save_checkpoint(peft_model, tmp_path / "checkpoint-1")
    raw = torch.load(dest / "pytorch_model.bin", weights_only=True)
    assert set(raw) == {"transformer.prefix_encoder.embedding.weight", "transformer.prefix_encoder.trans.0.weight",
                        "transformer.prefix_encoder.trans.0.bias", "transformer.prefix_encoder.trans.2.weight",
                        "transformer.prefix_encoder.trans.2.bias"}


def test_adapter_of_the_other_kind_is_refused(tmp_path: Path, tiny_model: Path) -> None:
    peft_model, _, _ = adapted(tiny_model, PTUNING)
    save_checkpoint(peft_model, tmp_path / "ptuning")
    with pytest.raises(ModelError, match=r"holds a PREFIX_TUNING adapter but peft.LORA is configured"):
        adapted(tiny_model, LORA, tmp_path / "ptuning")
    with pytest.raises(ModelError, match=r"nothing: not an adapter folder"):
        adapted(tiny_model, LORA, tmp_path / "nothing")
