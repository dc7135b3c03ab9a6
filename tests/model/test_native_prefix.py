"""P-tuning v2 with the model's own prefix encoder, as ChatGLM-6B/2/3 and the reference do it.

The checkpoint here carries ChatGLM-shaped code of its own (tests/support/remote_chatglm):
fedtune must switch on its `pre_seq_len`, train `transformer.prefix_encoder` alone, write it
in the reference's layout, and load it back the way the reference's inference snippet does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedtune.model.adapters import (
    NATIVE_PREFIX_CONFIG,
    PREFIX_WEIGHTS,
    ModelError,
    adapter_schema,
    apply_adapter,
    native_prefix_overrides,
    save_checkpoint,
    saved_adapter_kind,
)
from fedtune.model.base import load_base_model
from fedtune.spec import Lora, Peft, PrefixTuning
from fedtune.tools.chat import Chat, Sampling, answer_ids, load_for_chat

PROMPT = "根据提示词，写一首藏头诗。\n问：春夏秋冬\n答："


def ptuning(pre_seq_len: int = 4, projection: bool = False, **extra) -> Peft:
    return Peft(PREFIX_TUNING=PrefixTuning(pre_seq_len=pre_seq_len, prefix_projection=projection, **extra))


def prefix_tuned(folder: Path, peft: Peft, adapter: Path | None = None):
    model, tokenizer = load_base_model(folder, config_overrides=native_prefix_overrides(folder, peft))
    model, note = apply_adapter(model, peft, adapter)
    return model, tokenizer, note


def scrambled(model) -> None:
    """Give the prefix values no fresh initialisation would have, so loading it back is visible."""
    with torch.no_grad():
        for param in model.transformer.prefix_encoder.parameters():
            param.copy_(torch.randn_like(param))


@pytest.mark.parametrize("projection", [False, True])
def test_only_the_models_own_prefix_encoder_trains(remote_chatglm: Path, projection: bool) -> None:
    model, _, note = prefix_tuned(remote_chatglm, ptuning(projection=projection))
    names = [name for name, _ in adapter_schema(model)]
    assert names and all(n.startswith("transformer.prefix_encoder.") for n in names), names
    assert any("trans." in n for n in names) == projection
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("transformer.prefix_"))
    assert "pre_seq_len 4" in note and "own transformer.prefix_encoder" in note
    loss = model(**{k: torch.tensor([[2, 5, 6, 7]]) for k in ("input_ids", "labels")}).loss
    loss.backward()
    assert model.transformer.prefix_encoder.embedding.weight.grad is not None


def test_native_models_and_lora_keep_pefts_own_path(tiny_model: Path, remote_chatglm: Path) -> None:
    assert native_prefix_overrides(tiny_model, ptuning()) is None  # no code of its own: peft's prefix tuning
    lora = Peft(LORA=Lora(r=2, target_modules=["query_key_value"]))
    assert native_prefix_overrides(remote_chatglm, lora) is None
    assert native_prefix_overrides(remote_chatglm, ptuning(6, True)) == {"pre_seq_len": 6, "prefix_projection": True}


def test_prefix_hidden_size_is_refused_for_an_own_encoder(remote_chatglm: Path) -> None:
    with pytest.raises(ModelError, match=r"peft\.PREFIX_TUNING\.prefix_hidden_size"):
        native_prefix_overrides(remote_chatglm, ptuning(prefix_hidden_size=16))


def test_checkpoint_is_the_reference_layout_and_its_snippet_loads_it(remote_chatglm: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModel

    model, tokenizer, _ = prefix_tuned(remote_chatglm, ptuning())
    scrambled(model)
    ckpt = save_checkpoint(model, tmp_path / "checkpoint-1")
    assert sorted(p.name for p in ckpt.iterdir()) == sorted([PREFIX_WEIGHTS, NATIVE_PREFIX_CONFIG])
    assert saved_adapter_kind(ckpt) == "PREFIX_TUNING"
    saved = torch.load(ckpt / PREFIX_WEIGHTS, weights_only=True)
    assert list(saved) == ["transformer.prefix_encoder.embedding.weight"]

    # The reference's inference snippet, word for word but for the paths and half().
    config = AutoConfig.from_pretrained(remote_chatglm, trust_remote_code=True, pre_seq_len=4)
    snippet = AutoModel.from_pretrained(remote_chatglm, config=config, trust_remote_code=True)
    new_dict = {k[len("transformer.prefix_encoder."):]: v for k, v in saved.items()
                if k.startswith("transformer.prefix_encoder.")}
    snippet.transformer.prefix_encoder.load_state_dict(new_dict)
    snippet.eval()

    chat_model, chat_tokenizer = load_for_chat(remote_chatglm, ckpt)
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    with torch.no_grad():
        expected = snippet(input_ids=ids).logits
        assert torch.allclose(chat_model(input_ids=ids).logits, expected)
        assert torch.allclose(model.eval()(input_ids=ids).logits, expected)
    reply = answer_ids(chat_model, chat_tokenizer, PROMPT, 6, stop_at_eos=False)
    assert reply == snippet.generate(ids, max_new_tokens=6)[0, ids.shape[1]:].tolist()


def test_chat_streams_the_answer_of_an_own_prefix_checkpoint(remote_chatglm: Path, tmp_path: Path) -> None:
    """Through the model's own generate(), in a thread: the pieces as they come make the greedy answer."""
    model, _, _ = prefix_tuned(remote_chatglm, ptuning())
    scrambled(model)
    chat = Chat(remote_chatglm, save_checkpoint(model, tmp_path / "checkpoint-1"), device="cpu")
    pieces = list(chat.stream(PROMPT, Sampling(8)))
    whole = chat.tokenizer.decode(answer_ids(chat.model, chat.tokenizer, PROMPT, 8), skip_special_tokens=True)
    assert len(pieces) >= 2 and "".join(pieces).rstrip() == whole.strip()


def test_training_continues_from_a_saved_prefix(remote_chatglm: Path, tmp_path: Path) -> None:
    model, _, _ = prefix_tuned(remote_chatglm, ptuning())
    scrambled(model)
    ckpt = save_checkpoint(model, tmp_path / "checkpoint-0.5")
    resumed, _, note = prefix_tuned(remote_chatglm, ptuning(), ckpt)
    assert f"continuing from {ckpt}" in note
    assert torch.equal(resumed.transformer.prefix_encoder.embedding.weight,
                       model.transformer.prefix_encoder.embedding.weight)


def test_a_prefix_of_another_length_is_refused_naming_the_file(remote_chatglm: Path, tmp_path: Path) -> None:
    model, _, _ = prefix_tuned(remote_chatglm, ptuning(4))
    ckpt = save_checkpoint(model, tmp_path / "checkpoint-1")
    with pytest.raises(ModelError, match=rf"{PREFIX_WEIGHTS}.*shape.*pre_seq_len"):
        prefix_tuned(remote_chatglm, ptuning(5), ckpt)


def test_chat_refuses_an_own_encoder_prefix_on_a_model_without_one(tiny_model: Path, remote_chatglm: Path,
                                                                   tmp_path: Path) -> None:
    model, _, _ = prefix_tuned(remote_chatglm, ptuning())
    ckpt = save_checkpoint(model, tmp_path / "checkpoint-1")
    with pytest.raises(ModelError, match="builds none"):
        load_for_chat(tiny_model, ckpt)


def test_a_folder_with_its_own_code_loads_alike_every_time(remote_chatglm: Path) -> None:
    """transformers registers a remote class on its first load and takes it bare afterwards: LoRA must still apply."""
    lora = Peft(LORA=Lora(r=2, target_modules=["query_key_value"]))
    for _ in range(2):
        model, _ = load_base_model(remote_chatglm)
        peft_model, _ = apply_adapter(model, lora)
        assert hasattr(peft_model, "prepare_inputs_for_generation")
