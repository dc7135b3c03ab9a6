"""Whole federated jobs through real processes, real gRPC and a real redis-server."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from fedtune.federation.party import STATE_DIR
from fedtune.local.launcher import LocalJob
from fedtune.spec import load_job
from fedtune.train.loop import latest_state
from support.jobs import (
    PARTIES,
    POEMS,
    PTUNING,
    assert_identical_adapters,
    kill_after_first_round,
    run_cli,
    run_killing,
    wait_until,
    write_job,
)

pytestmark = pytest.mark.slow


def run_job(job: Path, out: Path) -> tuple[int, str, dict]:
    done = run_cli("run", str(job), "--output", str(out))
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return done.returncode, done.stdout + done.stderr, summary


def assert_every_quarter_round(out: Path) -> None:
    """Every party holds all four rounds of an agg_steps 0.25 job, and they end identical."""
    for party in PARTIES:
        names = sorted(p.name for p in (out / party).glob("checkpoint-*"))
        assert names == ["checkpoint-0.25", "checkpoint-0.5", "checkpoint-0.75", "checkpoint-1"]
    assert_identical_adapters(out, "checkpoint-1")


def assert_loss_falls(summary: dict) -> None:
    for party in PARTIES:
        losses = [loss for _, loss in summary["parties"][party]["losses"]]
        assert len(losses) >= 6, f"{party}: too few losses logged"
        third = len(losses) // 3  # whole thirds of training: single batches differ too much to compare
        first, last = sum(losses[:third]) / third, sum(losses[-third:]) / third
        assert last < first, f"{party}: loss did not fall: {losses}"


def test_lora_job_completes_identical_and_learning(tmp_path: Path, tiny_model: Path) -> None:
    job = write_job(tmp_path / "job", tiny_model, epochs=3)
    code, output, summary = run_job(job, tmp_path / "out")
    assert code == 0, output
    assert summary["phase"] == "Succeeded"
    for party in PARTIES:
        assert sorted(p.name for p in (tmp_path / "out" / party).glob("checkpoint-*")) == [
            "checkpoint-0.5", "checkpoint-1"]
        assert not (tmp_path / "out" / party / ".fedtune-state").exists()
        assert [r["round"] for r in summary["parties"][party]["rounds"]] == [1, 2]
    memory = summary["peak_pss_mb"]  # every process of the job, `fedtune run` itself among them
    assert {*PARTIES, "scheduler", "redis", "forkserver", "launcher"} <= set(memory)
    assert memory["job"] >= max(memory[name] for name in memory if name != "job") > 0
    assert (tmp_path / "out" / ".fedtune" / "logs" / "forkserver.log").is_file()
    final = assert_identical_adapters(tmp_path / "out", "checkpoint-1")
    assert_identical_adapters(tmp_path / "out", "checkpoint-0.5")
    assert all("lora_" in name for name in final)
    assert {"q_proj", "k_proj", "v_proj"} <= {part for name in final for part in name.split(".")}
    assert_loss_falls(summary)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "out" / "node-1" / "checkpoint-1"))
    weights = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert len(weights) == len(final)


def test_ptuning_job_completes_with_prefix_only(tmp_path: Path, tiny_model: Path) -> None:
    trainer = {"per_device_train_batch_size": 4, "learning_rate": 3e-2, "num_train_epochs": 3, "no_cuda": True}
    job = write_job(tmp_path / "job", tiny_model, peft=PTUNING, trainer=trainer)  # P-tuning's usual rate
    code, output, summary = run_job(job, tmp_path / "out")
    assert code == 0, output
    final = assert_identical_adapters(tmp_path / "out", "checkpoint-1")
    assert final and all("lm_head" not in name for name in final)
    assert sum(t.numel() for t in final.values()) < 10_000  # the prefix alone, not the head
    assert_loss_falls(summary)
    chat = run_cli("chat", "--model", str(tiny_model), "--adapter", str(tmp_path / "out" / "node-2" / "checkpoint-1"),
                   "--prompt", "根据提示词，写一首藏头诗。：\\n问：春夏秋冬\\n答：", "--max-new-tokens", "8")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip()


def test_ptuning_with_the_models_own_prefix_encoder(tmp_path: Path, remote_chatglm: Path) -> None:
    """A ChatGLM-style checkpoint (its own code, `pre_seq_len` in its config): the reference's P-tuning."""
    trainer = {"per_device_train_batch_size": 4, "learning_rate": 3e-2, "num_train_epochs": 3, "no_cuda": True}
    job = write_job(tmp_path / "job", remote_chatglm, peft=PTUNING, trainer=trainer)
    code, output, summary = run_job(job, tmp_path / "out")
    assert code == 0, output
    finals = {p: torch.load(tmp_path / "out" / p / "checkpoint-1" / "pytorch_model.bin", weights_only=True)
              for p in PARTIES}
    reference = finals[PARTIES[0]]
    assert list(reference) == ["transformer.prefix_encoder.embedding.weight"]  # the prefix alone travels
    assert all(torch.equal(reference[k], finals[p][k]) for p in PARTIES[1:] for k in reference)
    assert_loss_falls(summary)
    log = (tmp_path / "out" / ".fedtune" / "logs" / "node-1.log").read_text()
    assert "own transformer.prefix_encoder" in log
    chat = run_cli("chat", "--model", str(remote_chatglm), "--adapter",
                   str(tmp_path / "out" / "node-1" / "checkpoint-1"), "--prompt", "问：春\n答：",
                   "--max-new-tokens", "4")
    assert chat.returncode == 0, chat.stderr


def test_label_trainer_killed_mid_job_rejoins(tmp_path: Path, tiny_model: Path) -> None:
    # node-1 holds most data, so it is the slowest: the others wait for it at every round.
    job_path = write_job(tmp_path / "job", tiny_model, sizes=(16, 160, 16), agg_steps=0.25, epochs=1)
    local = LocalJob(load_job(job_path), tmp_path / "out", job_path.parent)
    try:
        local.start()
        kill_after_first_round(local)
        wait_until(local.finished, 300, "the job to finish after the restart", local)
        assert local.failed_role() is None
        assert local.status().phase == "Succeeded"
    finally:
        local.stop()
    assert_every_quarter_round(tmp_path / "out")
    log = (tmp_path / "out" / ".fedtune" / "logs" / "node-1.log").read_text()
    assert "resum" in log.lower()


def test_fedtune_run_restarts_a_killed_party_as_a_kubelet_would(tmp_path: Path, tiny_model: Path) -> None:
    """node-1, killed by a signal after round 1 (so it reports nothing), is started again by `fedtune run` itself
    (spec.backoffLimit allows 3) and resumes: the job succeeds, saying so, with every party's adapters the same."""
    job = write_job(tmp_path / "job", tiny_model, sizes=(16, 160, 16), agg_steps=0.25, epochs=1)
    out = tmp_path / "out"
    state = out / "node-1" / STATE_DIR / "trainer"
    code, stdout, stderr = run_killing(job, out, "node-1", lambda: latest_state(state) is not None,
                                       "node-1 to save its state after round 1")
    assert code == 0, stdout + stderr
    assert "node-1 exited with -9; restarted it (1 of spec.backoffLimit 3" in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["phase"] == "Succeeded" and summary["parties"]["node-1"]["restarts"] == 1
    assert summary["parties"]["node-2"]["restarts"] == 0
    assert_every_quarter_round(out)
    assert "resum" in (out / ".fedtune" / "logs" / "node-1.log").read_text().lower()


def test_assist_trainer_and_scheduler_killed_mid_job_rejoin(tmp_path: Path, tiny_model: Path) -> None:
    # The assist_trainer holds most data: the others wait on its aggregator while it is down.
    job_path = write_job(tmp_path / "job", tiny_model, sizes=(160, 16, 16), agg_steps=0.25, epochs=1)
    local = LocalJob(load_job(job_path), tmp_path / "out", job_path.parent)
    try:
        local.start()
        kill_after_first_round(local, "assist_trainer")
        local.kill_role("scheduler", signal.SIGKILL)
        local.start_role("scheduler")
        wait_until(local.finished, 300, "the job to finish after the restarts", local)
        assert local.status().phase == "Succeeded"
    finally:
        local.stop()
    assert_every_quarter_round(tmp_path / "out")


def assert_nothing_written(out: Path) -> None:
    leftovers = [p for p in out.rglob("*") if p.name.startswith("checkpoint-") or ".tmp" in p.name]
    assert not leftovers, leftovers


def test_malformed_dataset_fails_before_any_process_starts(tmp_path: Path, tiny_model: Path) -> None:
    """The whole command, as a user runs it (tests/runtime/test_preflight.py has every other case)."""
    job = write_job(tmp_path / "job", tiny_model)
    (tmp_path / "job" / "share-2.json").write_text('{"instruction": "x", "instances": [', encoding="utf-8")
    code, output, summary = run_job(job, tmp_path / "out")
    assert code == 2
    assert f"{job}: spec.parties[2].trainset: " in output and "share-2.json: malformed JSON" in output
    assert not summary and not (tmp_path / "out").exists()


def test_parties_with_mismatched_adapters_are_refused(tmp_path: Path, tiny_model: Path) -> None:
    from fedtune.model.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "wider", [POEMS], hidden_size=32)
    wider = {"node-2": {"pretrained_model": {"path": str(other)}}}
    job = write_job(tmp_path / "job", tiny_model, party_overrides=wider)
    code, output, _ = run_job(job, tmp_path / "out")
    assert code != 0
    assert "adapters do not match" in output and "node-2" in output
    assert_nothing_written(tmp_path / "out")


def test_rerun_into_used_output_is_refused(tmp_path: Path, tiny_model: Path) -> None:
    job = write_job(tmp_path / "job", tiny_model)
    (tmp_path / "out" / "node-1" / "checkpoint-1").mkdir(parents=True)
    marker = tmp_path / "out" / "node-1" / "checkpoint-1" / "adapter_model.safetensors"
    marker.write_bytes(b"earlier run")
    code, output, _ = run_job(job, tmp_path / "out")
    assert code == 2 and "holds an earlier run's results" in output and "--overwrite" in output
    assert marker.read_bytes() == b"earlier run"
