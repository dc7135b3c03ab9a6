"""Bad input fails before anything starts: `fedtune validate` and `fedtune run` check the job's files and keys,
name the job file and the field (and the data file and instance), exit 2 and write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.cli import main
from fedtune.local.preflight import check_job
from fedtune.spec import SpecError, load_job
from support.jobs import files_only_model, write_job

# The command runs in this process (`fedtune.cli.main`, its exit code returned): after the first
# test has imported transformers, the others need not pay for it again.


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return files_only_model(tmp_path / "model")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def fedtune(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def run_refused(capsys: pytest.CaptureFixture, job: Path, tmp_path: Path, *expected: str,
                command: str = "run") -> str:
    """`fedtune <command>` exits 2 naming the job file and `expected`; an output folder stays as it was."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "earlier.txt").write_text("kept")
    before = snapshot(out)
    args = [command, str(job)] + (["--output", str(out)] if command == "run" else [])
    code, message = fedtune(capsys, *args)
    assert code == 2, message
    assert str(job) in message, message
    for text in expected:
        assert text in message, f"{text!r} not in: {message}"
    assert snapshot(out) == before
    assert not any(p.name.startswith(".fedtune") for p in out.iterdir())
    return message


# --- datasets: exist, parse, keys, instances (all before any heavy import) ---------------------


def test_missing_dataset_names_field_and_file(capsys: pytest.CaptureFixture, tmp_path: Path, model: Path) -> None:
    job = write_job(tmp_path / "job", model)
    (tmp_path / "job" / "share-2.json").unlink()
    run_refused(capsys, job, tmp_path, "spec.parties[2].trainset[0].path", "share-2.json", "no such file")


@pytest.mark.parametrize("command", ["run", "validate"])
def test_malformed_dataset_names_file_and_line(capsys: pytest.CaptureFixture, tmp_path: Path, model: Path,
                                               command: str) -> None:
    job = write_job(tmp_path / "job", model)
    (tmp_path / "job" / "share-1.json").write_text('{"instruction": "x", "instances": [', encoding="utf-8")
    run_refused(capsys, job, tmp_path, "spec.parties[1].trainset", "share-1.json", "malformed JSON", "line 1",
                command=command)


def test_wrong_dataset_key_names_key_file_and_instance(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                       model: Path) -> None:
    job = write_job(tmp_path / "job", model, dataset={"key_query": "question"})
    run_refused(capsys, job, tmp_path, "share-0.json", "instances[0]", "`question`", "dataset.key_query")


def test_instance_without_answer_names_its_index(capsys: pytest.CaptureFixture, tmp_path: Path, model: Path) -> None:
    job = write_job(tmp_path / "job", model)
    share = tmp_path / "job" / "share-2.json"
    data = json.loads(share.read_text(encoding="utf-8"))
    del data["instances"][3]["output"]
    share.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    run_refused(capsys, job, tmp_path, "spec.parties[2].trainset", "share-2.json", "instances[3]", "`output`")


def test_empty_dataset_is_refused(capsys: pytest.CaptureFixture, tmp_path: Path, model: Path) -> None:
    job = write_job(tmp_path / "job", model)
    (tmp_path / "job" / "share-1.json").write_text('{"instruction": "x", "instances": []}', encoding="utf-8")
    run_refused(capsys, job, tmp_path, "spec.parties[1].trainset", "share-1.json", "no instances")


# --- the model folder ---------------------------------------------------------------------------


def test_model_folder_without_weights(capsys: pytest.CaptureFixture, tmp_path: Path, model: Path) -> None:
    (model / "model.safetensors").unlink()
    job = write_job(tmp_path / "job", model)
    run_refused(capsys, job, tmp_path, "spec.input.pretrained_model.path", str(model), "no model weights")


def test_model_folder_without_config(capsys: pytest.CaptureFixture, tmp_path: Path, model: Path) -> None:
    (model / "config.json").unlink()
    wider = {"node-2": {"pretrained_model": {"path": str(model)}}}
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    (other / "pytorch_model.bin").write_bytes(b"")
    job = write_job(tmp_path / "job", other, party_overrides=wider)
    run_refused(capsys, job, tmp_path, "spec.parties[2].pretrained_model.path", "no config.json")


def test_missing_shard_and_chatglm_v1_name_the_field(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                     model: Path) -> None:
    (model / "model.safetensors").unlink()
    index = {"weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                            "b.weight": "model-00002-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    (model / "model-00001-of-00002.safetensors").write_bytes(b"")
    job = write_job(tmp_path / "job", model)
    run_refused(capsys, job, tmp_path, "spec.input.pretrained_model.path",
                "shard model-00002-of-00002.safetensors named by model.safetensors.index.json is missing")
    (model / "model-00002-of-00002.safetensors").write_bytes(b"")
    (model / "config.json").write_text(json.dumps({"model_type": "chatglm", "position_encoding_2d": True}))
    run_refused(capsys, job, tmp_path, "spec.input.pretrained_model.path", "a ChatGLM-6B config without hidden_size")


# --- keys and rounds (these import transformers and peft) ---------------------------------------


def test_unknown_trainer_and_peft_keys(capsys: pytest.CaptureFixture, tmp_path: Path, model: Path) -> None:
    trainer = {"per_device_train_batch_size": 4, "num_train_epochs": 1, "learnin_rate": 0.1}
    job = write_job(tmp_path / "a", model, trainer=trainer)
    with pytest.raises(SpecError, match=r"a/job\.yaml: spec\.trainer\.learnin_rate: not an option of "
                                         r"transformers' TrainingArguments"):
        check_job(load_job(job), job.parent, str(job))
    lora = {"LORA": {"r": 4, "target_modules": ["query_key_value"], "lora_alpah": 8}}
    job = write_job(tmp_path / "b", model, peft=lora)
    run_refused(capsys, job, tmp_path, "spec.peft.LORA.lora_alpah", "LoraConfig")


def test_agg_steps_too_small_for_one_partys_steps(capsys: pytest.CaptureFixture, tmp_path: Path, model: Path) -> None:
    # 12 samples in batches of 4 for one epoch: 3 steps at the assist_trainer, too few for 4 rounds.
    job = write_job(tmp_path / "job", model, sizes=(12, 40, 40), agg_steps=0.25, epochs=1)
    run_refused(capsys, job, tmp_path, "party `assist_trainer` (12 samples, 3 steps)", "agg_steps is too small")


def test_a_sound_job_gets_its_plan(capsys: pytest.CaptureFixture, tmp_path: Path, model: Path) -> None:
    job = write_job(tmp_path / "job", model, sizes=(12, 20, 16), agg_steps=0.5, epochs=2)
    plans = check_job(load_job(job), job.parent, str(job))
    assert {n: (p.samples, p.max_steps, p.agg_steps) for n, p in plans.items()} == {
        "assist_trainer": (12, 6, (3, 6)), "node-1": (20, 10, (5, 10)), "node-2": (16, 8, (4, 8))}
    code, output = fedtune(capsys, "validate", str(job))
    assert code == 0, output
    assert "node-1: label_trainer, local" in output and "20 samples, 10 steps" in output


def test_more_label_trainers_than_the_limit_are_refused(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                        model: Path) -> None:
    from fedtune.spec import MAX_LABEL_TRAINERS

    job = write_job(tmp_path / "job", model, sizes=(4,) * (MAX_LABEL_TRAINERS + 2))
    for command in ("validate", "run"):
        message = run_refused(capsys, job, tmp_path, f"parties: {MAX_LABEL_TRAINERS + 2} parties",
                              f"at most {MAX_LABEL_TRAINERS} label_trainers", "CRD", command=command)
        assert "Traceback" not in message


def test_a_party_that_may_use_cuda_on_a_machine_without_it_is_said_to_train_on_the_cpu(
        capsys: pytest.CaptureFixture, tmp_path: Path, model: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: such a party trains on it")
    job = write_job(tmp_path / "job", model, party_overrides={"node-2": {"trainer": {"no_cuda": False}}})
    code, output = fedtune(capsys, "validate", str(job))
    assert code == 0, output
    assert "note: this machine has no CUDA device: node-2 (trainer.no_cuda: false) train on the CPU" in output
    code, output = fedtune(capsys, "validate", str(write_job(tmp_path / "cpu", model)))
    assert code == 0 and "no CUDA device" not in output


# --- the output folder --------------------------------------------------------------------------


def test_output_path_shared_by_parties_is_refused(capsys: pytest.CaptureFixture, tmp_path: Path, model: Path) -> None:
    job = write_job(tmp_path / "job", model, output={"path": str(tmp_path / "adapters" / "[JOB_ID]")})
    code, output = fedtune(capsys, "run", str(job))
    assert code == 2, output
    assert str(job) in output and "spec.output.path" in output and "[NODE_ID]" in output
    assert not (tmp_path / "adapters").exists()


def test_malformed_valset_names_its_field(capsys: pytest.CaptureFixture, tmp_path: Path, model: Path) -> None:
    job = write_job(tmp_path / "job", model, party_overrides={"node-2": {"valset": [{"path": "val.json"}]}})
    (tmp_path / "job" / "val.json").write_text('{"instruction": "x", "instances": [{"input": "q"}]}')
    run_refused(capsys, job, tmp_path, "spec.parties[2].valset", "val.json", "instances[0]", "`output`")


def test_the_data_checks_import_no_training_stack() -> None:
    """What lets a malformed dataset fail within a second: checking it loads neither torch nor transformers."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import sys, fedtune.cli, fedtune.local.preflight; "
                           "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_run_checks_the_keys_outside_its_own_process(tmp_path: Path, model: Path) -> None:
    """`fedtune run` makes the checks that import transformers and peft in its fork server: the launcher,
    alive for the whole job, never holds them (hundreds of MB), and the refusal reads as `validate`'s."""
    import subprocess
    import sys

    lora = {"LORA": {"r": 4, "target_modules": ["query_key_value"], "lora_alpah": 8}}
    job = write_job(tmp_path / "job", model, peft=lora)
    script = ("import sys; from fedtune.cli import main; code = main(['run', sys.argv[1], '--output', sys.argv[2]]); "
              "print(code, sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script, str(job), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=300)
    assert done.stdout.strip() == "2 []", done.stdout + done.stderr
    assert f"{job}: spec.peft.LORA.lora_alpah: not an option of peft's LoraConfig" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()
