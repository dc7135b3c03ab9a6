"""`fedtune import-xfl`: the reference's config folder becomes an equivalent job YAML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fedtune.spec import SpecError, parse_job
from fedtune.xfl import import_xfl
from support.jobs import run_cli

TRAIN_PARAMS = {
    "aggregation": {"agg_steps": 0.2},
    "encryption": {"otp": {"key_bitlength": 64, "data_type": "torch.Tensor",
                           "key_exchange": {"key_bitlength": 3072, "optimized": True},
                           "csprng": {"name": "hmac_drbg", "method": "sha512"}}},
    "peft": {"LORA": {"task_type": "CAUSAL_LM", "r": 8, "target_modules": ["query_key_value"], "lora_alpha": 32,
                      "lora_dropout": 0.1, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None}},
    "trainer": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 4, "learning_rate": 1e-3,
                "weight_decay": 1e-4, "num_train_epochs": 2, "save_strategy": "steps", "torch_compile": False,
                "no_cuda": True, "seed": 42},
    "dataset": {"max_src_length": 100, "max_dst_length": 100, "prompt_pattern": "{}：\n问：{}\n答：",
                "key_query": "input", "key_answer": "output"},
}


def write_xfl(folder: Path) -> Path:
    folder.mkdir()
    fed_conf = {
        "fed_info": {"scheduler": {"scheduler": "localhost:55005"},
                     "trainer": {"node-1": "localhost:56001", "node-2": "localhost:56002"},
                     "assist_trainer": {"assist_trainer": "localhost:55004"}},
        "redis_server": "localhost:6379", "grpc": {"use_tls": False},
    }
    (folder / "fed_conf.json").write_text(json.dumps(fed_conf))
    for node, identity in [("assist_trainer", "assist_trainer"), ("node-1", "label_trainer"),
                           ("node-2", "label_trainer")]:
        params = TRAIN_PARAMS if identity == "assist_trainer" else {
            "trainer": {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 16,
                        "save_strategy": "steps", "torch_compile": False, "no_cuda": True}}
        config = [{
            "identity": identity, "model_info": {"name": "horizontal_chatglm"},
            "input": {"trainset": [{"type": "QA", "path": f"/data/{node}"}],
                      "pretrained_model": {"path": "/models/chatglm-6b"}},
            "output": {"path": "/opt/checkpoints/[JOB_ID]/[NODE_ID]"},
            "train_info": {"train_params": params},
        }]
        (folder / f"trainer_config_{node}.json").write_text(json.dumps(config, ensure_ascii=False))
    return folder


def test_import_carries_every_key(tmp_path: Path) -> None:
    text = import_xfl(write_xfl(tmp_path / "3party"))
    job = parse_job(yaml.safe_load(text))
    spec = job.spec
    assert job.job_id == "3party"
    assert spec.encryption.otp is not None and spec.encryption.otp.key_exchange.key_bitlength == 3072
    assert spec.peft.LORA is not None and spec.peft.LORA.lora_alpha == 32
    assert spec.trainer.learning_rate == 1e-3 and spec.trainer.gradient_accumulation_steps == 4
    assert spec.dataset.prompt_pattern == "{}：\n问：{}\n答："
    assert spec.input.pretrained_model.path == "/models/chatglm-6b"
    assert spec.output.path == "/opt/checkpoints/[JOB_ID]/[NODE_ID]"
    assert [(p.name, p.role) for p in spec.parties] == [
        ("assist_trainer", "assist_trainer"), ("node-1", "label_trainer"), ("node-2", "label_trainer")]
    node1 = spec.party("node-1")
    assert node1.trainer.gradient_accumulation_steps == 16 and node1.trainer.per_device_train_batch_size == 1
    assert spec.trainer_args(node1)["learning_rate"] == 1e-3  # synchronised from the assist_trainer
    assert spec.tls.enabled is False  # the reference's grpc.use_tls


@pytest.mark.parametrize("otp", [TRAIN_PARAMS["encryption"]["otp"], {"key_bitlength": 64}])
def test_imported_otp_keeps_the_reference_key_exchange_and_generator(tmp_path: Path, monkeypatch, otp: dict) -> None:
    """fedtune's own defaults are x25519 and chacha20; an imported job behaves as it did in the reference."""
    from fedtune.secagg import make_codec

    monkeypatch.setitem(TRAIN_PARAMS, "encryption", {"otp": otp})
    imported = parse_job(yaml.safe_load(import_xfl(write_xfl(tmp_path / "xfl")))).spec.encryption
    codec = make_codec(imported)
    assert (codec.key_agreement.name, codec.generator.name, codec.generator.method) == (
        "ffdhe3072", "hmac_drbg", "sha512")
    fresh = make_codec({"otp": {}})
    assert (fresh.key_agreement.name, fresh.generator.name) == ("x25519", "chacha20")


def test_import_cli_writes_file(tmp_path: Path) -> None:
    folder = write_xfl(tmp_path / "demo")
    out = tmp_path / "job.yaml"
    done = run_cli("import-xfl", str(folder), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert parse_job(yaml.safe_load(out.read_text())).spec.peft.kind == "LORA"


def test_import_errors_name_the_file(tmp_path: Path) -> None:
    folder = write_xfl(tmp_path / "broken")
    (folder / "trainer_config_node-2.json").write_text("[{\"identity\": ")
    with pytest.raises(SpecError, match=r"trainer_config_node-2\.json: not valid JSON"):
        import_xfl(folder)
    (folder / "trainer_config_node-2.json").unlink()
    with pytest.raises(SpecError, match=r"trainer_config_node-2\.json: not found"):
        import_xfl(folder)
