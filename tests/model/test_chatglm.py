"""ChatGLM2/3 and GLM-4 remote-code folders: converted to the native GLM at load and by `fedtune convert`, their
sentencepiece tokenizer, adapters written back in ChatGLM's names, and the refusals.

The checkpoints are small and random, in the format's own layout (tests/support/chatglm_format), and every
comparison is against `ReferenceChatGLM`, a forward pass written from the format's definition.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedtune.cli import main
from fedtune.model.adapters import ModelError, apply_adapter, save_checkpoint
from fedtune.model.base import load_base_model
from fedtune.model.chatglm import export_adapter, load_tokenizer
from fedtune.model.precision import Precision
from fedtune.spec import Peft
from fedtune.tools.chat import load_for_chat
from support.chatglm_format import load_reference, read_ranks, tiktoken_encode, write_checkpoint
from support.jobs import POEMS

TEXTS = ["床前明月光，疑是地上霜。", "Hello, world!  two  spaces\nand a newline", "emoji 🙂 and ünïcödé", " lead"]
IDS = torch.tensor([[5, 17, 99, 3, 250, 41, 8, 300, 12, 7], [60, 61, 62, 400, 2, 9, 10, 11, 500, 1]])


@pytest.fixture(scope="module")
def chatglm3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("chatglm") / "chatglm3", [POEMS])


@pytest.fixture(scope="module")
def glm4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GLM-4's settings (rope_ratio 500, its epsilon) and tiktoken tokenizer, .bin shards, three of them."""
    return write_checkpoint(tmp_path_factory.mktemp("chatglm") / "glm4", [POEMS], glm4=True, shards=3,
                            weights_format="bin", seed=1)


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- conversion -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chatglm3", "glm4"])
def test_converted_model_computes_the_formats_logits(request: pytest.FixtureRequest, name: str) -> None:
    folder = request.getfixturevalue(name)
    model, _ = load_base_model(folder)
    assert type(model).__name__ == "GlmForCausalLM"
    expected = logits(load_reference(folder))
    assert torch.allclose(logits(model), expected, atol=1e-4, rtol=0), (logits(model) - expected).abs().max()


def test_chatglm2_32k_rope_ratio_divides_the_positions(tmp_path: Path) -> None:
    """ChatGLM2-6B-32k's rope_ratio (16) divides the positions, where ChatGLM3's and GLM-4's multiply the rotary base;
    the folder's own code says which, and a folder without it is refused rather than guessed."""
    folder = write_checkpoint(tmp_path / "chatglm2-32k", [POEMS], rope="positions", rope_ratio=16,
                              _name_or_path="THUDM/chatglm2-6b-32k", seq_length=32768)
    model, _ = load_base_model(folder)
    expected = logits(load_reference(folder, rope_scales_positions=True))
    assert torch.allclose(logits(model), expected, atol=1e-4, rtol=0), (logits(model) - expected).abs().max()
    assert not torch.allclose(logits(load_reference(folder)), expected, atol=1e-3)  # the base reading differs
    (folder / "modeling_chatglm.py").unlink()
    with pytest.raises(ModelError, match=r"config.json: rope_ratio 16: modeling_chatglm.py is missing"):
        load_base_model(folder)


def test_fedtune_convert_writes_a_folder_transformers_loads_without_remote_code(chatglm3: Path,
                                                                                 tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["convert", str(chatglm3), str(tmp_path / "native")]) == 0
    config = json.loads((tmp_path / "native" / "config.json").read_text())
    assert config["model_type"] == "glm" and "auto_map" not in config
    assert not list((tmp_path / "native").glob("*.py"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "native", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "native", local_files_only=True)
    assert torch.allclose(logits(model), logits(load_reference(chatglm3)), atol=1e-4, rtol=0)
    original = load_tokenizer(chatglm3)
    assert all(tokenizer(t)["input_ids"] == original(t)["input_ids"] for t in TEXTS)
    assert main(["convert", str(chatglm3), str(tmp_path / "native")]) == 2  # an existing DST is never overwritten


def test_half_precision_conversion_keeps_the_dtype(chatglm3: Path) -> None:
    model, _ = load_base_model(chatglm3, precision=Precision(torch.bfloat16))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.allclose(logits(model).float(), logits(load_reference(chatglm3)), atol=0.15, rtol=0.05)


# --- tokenizer -------------------------------------------------------------------------------


def test_tokenizer_gives_sentencepieces_ids_after_gmask_sop(chatglm3: Path) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(chatglm3 / "tokenizer.model"))
    tokenizer = load_tokenizer(chatglm3)
    gmask, sop = sp.vocab_size() + 1, sp.vocab_size() + 3  # ChatGLM's specials follow the pieces
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == [gmask, sop, *sp.encode(text)], text
        assert tokenizer.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    assert tokenizer.eos_token_id == sp.eos_id() and tokenizer.pad_token_id == sp.unk_id()


def test_glm4_tokenizer_is_tiktokens_byte_level_bpe(glm4: Path) -> None:
    ranks = read_ranks(glm4 / "tokenizer.model")
    tokenizer = load_tokenizer(glm4)
    gmask, sop = len(ranks) + 2, len(ranks) + 4  # tokenizer_config.json: [gMASK] and <sop> after <|endoftext|>
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == [gmask, sop, *tiktoken_encode(text, ranks)], text
        assert tokenizer.decode(tiktoken_encode(text, ranks)) == text
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == len(ranks)
    assert tokenizer.convert_tokens_to_ids("<|user|>") == len(ranks) + 7


# --- adapters in ChatGLM's names ---------------------------------------------------------------


def randomized(peft_model) -> None:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


@pytest.mark.parametrize("targets", [["query_key_value"], ["query_key_value", "dense", "dense_4h_to_h"], ["dense"]])
def test_lora_written_back_loads_into_the_format_with_peft(chatglm3: Path, tmp_path: Path, targets: list) -> None:
    from peft import PeftModel

    model, _ = load_base_model(chatglm3)
    peft_model, _ = apply_adapter(model, Peft.model_validate({"LORA": {"r": 2, "lora_alpha": 8, "lora_dropout": 0.0,
                                                                       "target_modules": targets}}))
    randomized(peft_model)
    checkpoint = save_checkpoint(peft_model, tmp_path / "checkpoint-1")
    assert main(["export-adapter", str(checkpoint), str(tmp_path / "chatglm")]) == 0
    saved = json.loads((tmp_path / "chatglm" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == sorted(t.split(".")[-1] for t in targets)
    # The reference's inference snippet: the model in its own names, then PeftModel.from_pretrained.
    reference = PeftModel.from_pretrained(load_reference(chatglm3), str(tmp_path / "chatglm")).eval()
    expected = logits(peft_model.eval())
    assert not torch.allclose(expected, logits(load_reference(chatglm3)), atol=1e-3)  # the adapter matters
    assert torch.allclose(logits(reference), expected, atol=1e-4, rtol=0)
    # And back: `fedtune chat` takes the exported adapter onto the converted model.
    if "query_key_value" in targets or "dense" in targets:
        chatted, _ = load_for_chat(chatglm3, tmp_path / "chatglm")
        assert torch.allclose(logits(chatted), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("targets", "alpha_pattern"), [
    (["query_key_value"], {}),
    (["query_key_value", "dense", "dense_4h_to_h"], {}),
    # Paths as peft also takes them, and layer 0's q/k/v scaled apart from layer 1's.
    (["self_attention.query_key_value", "self_attention.dense"],
     {"transformer.encoder.layers.0.self_attention.query_key_value": 16}),
])
def test_a_lora_trained_on_chatglm_itself_loads_onto_the_converted_model(chatglm3: Path, tmp_path: Path,
                                                                         targets: list, alpha_pattern: dict) -> None:
    """The reference's own adapters (peft on ChatGLM's modules: a dense B on query_key_value) serve
    `fedtune chat` and continued training on the converted model, with the same logits."""
    from peft import LoraConfig, get_peft_model

    reference = get_peft_model(load_reference(chatglm3), LoraConfig(r=2, lora_alpha=8, lora_dropout=0.0,
                                                                     target_modules=targets,
                                                                     alpha_pattern=alpha_pattern))
    randomized(reference)
    reference.save_pretrained(str(tmp_path / "xfl"))
    expected = logits(reference.eval())
    assert not torch.allclose(expected, logits(load_reference(chatglm3)), atol=1e-3)  # the adapter matters
    chatted, _ = load_for_chat(chatglm3, tmp_path / "xfl")
    assert torch.allclose(logits(chatted), expected, atol=1e-4, rtol=0)
    base, _ = load_base_model(chatglm3)
    lora = Peft.model_validate({"LORA": {"r": 2, "lora_alpha": 8, "target_modules": ["query_key_value"]}})
    continued, _ = apply_adapter(base, lora, tmp_path / "xfl")
    assert torch.allclose(logits(continued.eval()), expected, atol=1e-4, rtol=0)
    assert any(p.requires_grad for p in continued.parameters())


def test_ptuning_prefix_loads_into_the_format_as_the_reference_snippet_does(chatglm3: Path, tmp_path: Path) -> None:
    model, _ = load_base_model(chatglm3)
    peft_model, _ = apply_adapter(model, Peft.model_validate({"PREFIX_TUNING": {"pre_seq_len": 3}}))
    randomized(peft_model)
    checkpoint = save_checkpoint(peft_model, tmp_path / "checkpoint-1")
    assert main(["export-adapter", str(checkpoint), str(tmp_path / "chatglm")]) == 0
    # The snippet: the config's pre_seq_len, then transformer.prefix_encoder.* from pytorch_model.bin.
    reference = load_reference(chatglm3, pre_seq_len=3)
    saved = torch.load(tmp_path / "chatglm" / "pytorch_model.bin", weights_only=True)
    prefix = {k.removeprefix("transformer.prefix_encoder."): v for k, v in saved.items()}
    reference.transformer.prefix_encoder.load_state_dict(prefix)
    assert torch.allclose(logits(reference), logits(peft_model.eval()), atol=1e-4, rtol=0)
    peft_model.train()  # in training (read-only prefix cache) the function is the same
    assert torch.allclose(logits(peft_model), logits(reference), atol=1e-4, rtol=0)


def test_export_refuses_what_chatglm_cannot_load(chatglm3: Path, tmp_path: Path) -> None:
    model, _ = load_base_model(chatglm3)
    projected = Peft.model_validate({"PREFIX_TUNING": {"pre_seq_len": 3, "prefix_projection": True}})
    checkpoint = save_checkpoint(apply_adapter(model, projected)[0], tmp_path / "projected")
    with pytest.raises(ModelError, match="prefix_projection"):
        export_adapter(checkpoint, tmp_path / "out")
    model, _ = load_base_model(chatglm3)
    only_q = Peft.model_validate({"LORA": {"r": 2, "target_modules": ["q_proj"]}})
    checkpoint = save_checkpoint(apply_adapter(model, only_q)[0], tmp_path / "only-q")
    with pytest.raises(ModelError, match=r"not all of q, k, v"):
        export_adapter(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- what is refused, naming the file and the reason ---------------------------------------------


def edited_copy(src: Path, dst: Path, **config: object) -> Path:
    import shutil

    shutil.copytree(src, dst)
    data = json.loads((dst / "config.json").read_text())
    data.update(config)
    for key in [k for k, v in config.items() if v is None]:
        del data[key]
    (dst / "config.json").write_text(json.dumps(data))
    return dst


def test_chatglm_6b_v1_without_its_tokenizer_is_refused_naming_the_file(chatglm3: Path, tmp_path: Path) -> None:
    v1 = edited_copy(chatglm3, tmp_path / "v1", position_encoding_2d=True, inner_hidden_size=16384, vocab_size=130528,
                     kv_channels=None, ffn_hidden_size=None)
    with pytest.raises(ModelError, match=r"v1: no ice_text\.model \(ChatGLM-6B's tokenizer\)"):
        load_base_model(v1)


def test_broken_folders_are_refused_naming_the_file(chatglm3: Path, tmp_path: Path) -> None:
    shard = next(chatglm3.glob("model-00002-*.safetensors")).name
    missing = edited_copy(chatglm3, tmp_path / "missing")
    (missing / shard).unlink()
    with pytest.raises(ModelError, match=rf"missing: shard {shard} named by model.safetensors.index.json is missing"):
        load_base_model(missing)
    quantized = edited_copy(chatglm3, tmp_path / "int4", quantization_bit=4)
    with pytest.raises(ModelError, match=r"int4/config.json: quantization_bit 4"):
        load_base_model(quantized)
    wrong = edited_copy(chatglm3, tmp_path / "wrong", ffn_hidden_size=80)
    with pytest.raises(ModelError, match=r"mlp.gate_up_proj.weight` has shape \(192, 64\), config.json implies"):
        load_base_model(wrong)
    unknown = edited_copy(chatglm3, tmp_path / "unknown", model_type="mystery", auto_map=None)
    with pytest.raises(ModelError, match=r"unknown/config.json: model_type 'mystery' is not a format fedtune loads"):
        load_base_model(unknown)
    with pytest.raises(ModelError, match=r"quantization: .* ChatGLM remote-code folder"):
        load_base_model(chatglm3, precision=Precision(torch.bfloat16, "4bit"))


def test_remote_code_that_fails_on_this_transformers_is_named(tiny_model: Path, tmp_path: Path) -> None:
    """What ChatGLM-6B's own code does on transformers 5 (an AttributeError inside it) becomes a clear error."""
    import shutil

    folder = tmp_path / "old-remote"
    shutil.copytree(tiny_model, folder)
    # A config class of its own: transformers registers remote classes per config class for the whole process.
    (folder / "configuration_old.py").write_text(
        "from transformers import PretrainedConfig\n"
        "class OldConfig(PretrainedConfig):\n"
        "    model_type = 'old_remote_test'\n")
    (folder / "modeling_old.py").write_text(
        "from transformers import PreTrainedModel\n"
        "from .configuration_old import OldConfig\n"
        "class Old(PreTrainedModel):\n"
        "    config_class = OldConfig\n"
        "    def __init__(self, config):\n"
        "        raise AttributeError(\"'Old' object has no attribute 'all_tied_weights_keys'\")\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="old_remote_test", auto_map={"AutoConfig": "configuration_old.OldConfig",
                                                          "AutoModelForCausalLM": "modeling_old.Old"})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"old-remote: cannot load the model \(in the folder's own modelling code\): "
                                         r"AttributeError: .*all_tied_weights_keys"):
        load_base_model(folder)
