"""Whole jobs on a ChatGLM remote-code folder, and precision a party's device cannot do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from support.chatglm_format import load_reference, write_checkpoint
from support.jobs import PARTIES, POEMS, assert_identical_adapters, run_cli, write_job

pytestmark = pytest.mark.slow

LORA = {"LORA": {"r": 4, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["query_key_value"]}}


def run_job(job: Path, out: Path) -> tuple[int, str]:
    done = run_cli("run", str(job), "--output", str(out))
    return done.returncode, done.stdout + done.stderr


def test_lora_job_on_a_chatglm3_folder_exports_an_adapter_chatglms_code_loads(tmp_path: Path) -> None:
    from peft import PeftModel

    from fedtune.model.base import load_base_model

    folder = write_checkpoint(tmp_path / "chatglm3", [POEMS])
    job = write_job(tmp_path / "job", folder, peft=LORA, sizes=(8, 8, 8), epochs=1)
    code, output = run_job(job, tmp_path / "out")
    assert code == 0, output
    checkpoint = tmp_path / "out" / PARTIES[1] / "checkpoint-1"
    assert_identical_adapters(tmp_path / "out", "checkpoint-1")
    exported = tmp_path / "chatglm-adapter"
    done = run_cli("export-adapter", str(checkpoint), str(exported))
    assert done.returncode == 0, done.stderr

    ids = torch.tensor([[5, 17, 99, 3, 250, 41, 8, 300]])
    with torch.no_grad():
        native = PeftModel.from_pretrained(load_base_model(folder)[0], str(checkpoint)).eval()(input_ids=ids).logits
        original = PeftModel.from_pretrained(load_reference(folder), str(exported)).eval()(input_ids=ids).logits
        base = load_reference(folder)(input_ids=ids).logits
    assert not torch.allclose(native, base, atol=1e-4)  # training moved the adapter
    assert torch.allclose(original, native, atol=1e-4, rtol=0)
    assert json.loads((exported / "adapter_config.json").read_text())["target_modules"] == ["query_key_value"]


def test_float16_on_the_cpu_fails_the_job_before_training_naming_the_field(tmp_path: Path, tiny_model: Path) -> None:
    job = write_job(tmp_path / "job", tiny_model, input={"pretrained_model": {"path": str(tiny_model),
                                                                              "dtype": "float16"}})
    code, output = run_job(job, tmp_path / "out")
    assert code != 0
    assert "input.pretrained_model.dtype: float16 needs a GPU" in output
    assert not list((tmp_path / "out").glob("*/checkpoint-*"))
