"""A 3-party job for each adapter type beyond LoRA and P-tuning v2: it runs through, every party ends with the
same global adapter, and AdaLoRA's parties prune the same ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.jobs import PARTIES, assert_identical_adapters, run_cli, write_job

pytestmark = pytest.mark.slow

TYPES = {
    "ADALORA": {"init_r": 4, "target_r": 2, "target_modules": ["query_key_value"]},
    "IA3": {"target_modules": ["query_key_value", "dense_4h_to_h"], "feedforward_modules": ["dense_4h_to_h"]},
    "LOHA": {"r": 4, "target_modules": ["query_key_value"]},
    "LOKR": {"r": 4, "target_modules": ["query_key_value"]},
    "OFT": {"target_modules": ["query_key_value"]},
    "BOFT": {"target_modules": ["query_key_value"], "boft_block_size": 4},
}


@pytest.mark.parametrize("kind", list(TYPES))
def test_three_party_job_for_each_adapter_type(tmp_path: Path, tiny_model: Path, kind: str) -> None:
    job = write_job(tmp_path / "job", tiny_model, peft={kind: TYPES[kind]}, sizes=(8, 8, 8), epochs=1)
    out = tmp_path / "out"
    done = run_cli("run", str(job), "--output", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["phase"] == "Succeeded"
    for checkpoint in ("checkpoint-0.5", "checkpoint-1"):
        final = assert_identical_adapters(out, checkpoint)
    config = json.loads((out / PARTIES[1] / "checkpoint-1" / "adapter_config.json").read_text())
    assert config["peft_type"] == kind
    if kind == "ADALORA":  # the last round prunes to target_r per module, the same triplets at every party
        kept = config["rank_pattern"]
        assert kept and all(sum(mask) <= 4 for mask in kept.values())
        assert sum(sum(mask) for mask in kept.values()) == 2 * len(kept)
        assert sum(t.shape[0] for n, t in final.items() if "lora_E" in n) == 2 * len(kept)
        for party in PARTIES[1:]:
            other = json.loads((out / party / "checkpoint-1" / "adapter_config.json").read_text())
            assert other["rank_pattern"] == kept
