"""`fedtune import-xfl`: each of XFL's horizontal ChatGLM demo folders becomes a job that runs as XFL runs it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedtune.cli import main
from fedtune.spec import SpecError, parse_job
from fedtune.tools.xfl import import_xfl
from support import upstream_env
from support.xfl_demos import DEMOS, ENV, OTP, Demo, write_demo, write_xfl_home

DEMO_IDS = [d.name for d in DEMOS]


def imported(config: Path, demo: Demo, **kwargs):
    return import_xfl(config, environ=ENV if demo.env else {}, **kwargs)


@pytest.mark.parametrize("demo", DEMOS, ids=DEMO_IDS)
def test_every_demo_folder_converts_as_xfl_reads_it(tmp_path: Path, demo: Demo) -> None:
    home = write_xfl_home(tmp_path / "XFL", tmp_path / "model")
    result = imported(write_demo(home, demo), demo)
    job = parse_job(yaml.safe_load(result.text))
    spec = job.spec
    assert job.job_id == "xfl-" + demo.name.replace("_", "-")  # named after the demo; Kubernetes wants a letter first
    names = [p.name for p in spec.parties]
    expected = [n for n, _ in demo.nodes] if demo.standalone else ["assist_trainer", *(n for n, _ in demo.nodes)]
    assert sorted(names) == sorted(expected)
    assert spec.standalone == demo.standalone
    assert all(p.remote is None for p in spec.parties)  # every node runs here, as in XFL's one-machine demos
    # Paths as XFL resolves them: relative to <XFL>/python.
    assert spec.input.pretrained_model.path == str(home / "demo" / "horizontal" / "chatglm" / "chatglm-demo")
    for node, part in demo.nodes:
        party = spec.party(node)
        assert [t.path for t in spec.trainset(party)] == [str(home / "dataset" / "poetry_small" /
                                                            f"hhpoetry-{part}.json")]
        assert party.trainer.per_device_train_batch_size == 2 and party.trainer.no_cuda is True
        assert (party.pretrained_model is not None) == (node == demo.own_model)
    if demo.assist_data is None:
        assert spec.trainset(spec.party("assist_trainer")) == []  # it only aggregates
    assert spec.output is not None and spec.output.path == "/opt/checkpoints/[JOB_ID]/[NODE_ID]"
    assert spec.aggregation.weighting == "uniform" and spec.aggregation.agg_steps == 0.5
    assert spec.peft.kind == next(iter(demo.peft))
    assert spec.encryption.otp is not None and spec.encryption.otp.key_exchange.key_bitlength == 3072
    assert spec.tls.enabled  # XFL's use_tls: false is not carried over
    assert spec.scheduler.address == ("localhost:55004" if demo.env else "localhost:55005")
    assert spec.redis.address == "localhost:6379"
    notes = " | ".join(result.notes)
    assert "weighting: uniform" in notes and "keeps mutual TLS on" in notes
    assert ("trains alone" in notes) == demo.standalone


@pytest.mark.slow
@pytest.mark.parametrize("demo", DEMOS, ids=DEMO_IDS)
def test_every_demo_folder_runs(tmp_path: Path, request: pytest.FixtureRequest, demo: Demo) -> None:
    """The command a user types: import the folder (the env demo with XFL's variables set), run the job; on the
    reference's own `chatglm-demo` (ChatGLM-6B: config and code, no weights) where it is at hand, as shipped."""
    shipped = upstream_env.reference_folder()
    model = shipped if (shipped / "config.json").is_file() else request.getfixturevalue("remote_chatglm")
    home = write_xfl_home(tmp_path / "XFL", model)
    config = write_demo(home, demo)
    job = tmp_path / "job.yaml"
    env = {**os.environ, **(ENV if demo.env else {})}
    done = subprocess.run([sys.executable, "-m", "fedtune", "import-xfl", str(config), "-o", str(job)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "fedtune", "run", str(job), "--output", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["phase"] == "Succeeded"
    parties = [n for n, _ in demo.nodes] + ([] if demo.standalone else ["assist_trainer"])
    for party in parties:
        assert sorted(p.name for p in (out / party).glob("checkpoint-*")) == ["checkpoint-0.5", "checkpoint-1"]
    final = {p: (out / p / "checkpoint-1" / ("pytorch_model.bin" if "PREFIX_TUNING" in demo.peft else
                                                 "adapter_model.safetensors")).read_bytes() for p in parties}
    if "LORA" in demo.peft:
        assert len(set(final.values())) == 1, "every party holds the same global adapter"


@pytest.mark.parametrize("otp", [OTP["otp"], {"key_bitlength": 64}], ids=["as-in-the-demos", "bits-only"])
def test_imported_otp_keeps_the_reference_key_exchange_and_generator(tmp_path: Path, otp: dict) -> None:
    """fedtune's own defaults are x25519 and chacha20; an imported job behaves as it did in XFL."""
    from fedtune.secagg import make_codec

    demo = next(d for d in DEMOS if d.name == "3party_lora")
    config = write_demo(write_xfl_home(tmp_path / "XFL", tmp_path / "model"), demo)
    assist = config / "trainer_config_assist_trainer.json"
    data = json.loads(assist.read_text())
    data[0]["train_info"]["train_params"]["encryption"] = {"otp": otp}
    assist.write_text(json.dumps(data))
    codec = make_codec(parse_job(yaml.safe_load(imported(config, demo).text)).spec.encryption)
    assert (codec.key_agreement.name, codec.generator.name, codec.generator.method) == (
        "ffdhe3072", "hmac_drbg", "sha512")
    fresh = make_codec({"otp": {}})
    assert (fresh.key_agreement.name, fresh.generator.name) == ("x25519", "chacha20")


def test_only_the_nodes_run_here_are_local(tmp_path: Path) -> None:
    demo = next(d for d in DEMOS if d.name == "3party_lora")
    home = write_xfl_home(tmp_path / "XFL", tmp_path / "model")
    config = write_demo(home, demo)
    spec = parse_job(yaml.safe_load(imported(config, demo, local=["node-2"]).text)).spec
    assert spec.party("node-2").remote is None
    assert spec.party("assist_trainer").remote.address == "localhost:55004"
    assert spec.party("node-1").remote.address == "localhost:56001"
    assert spec.scheduler.address == "localhost:55005"
    with pytest.raises(SpecError, match=r"--local node-9: not a node of .*fed_conf\.json"):
        imported(config, demo, local=["node-9"])


def test_paths_resolve_against_another_base(tmp_path: Path) -> None:
    """A config folder copied out of the XFL checkout: its relative paths need --base-dir."""
    demo = DEMOS[0]
    home = write_xfl_home(tmp_path / "XFL", tmp_path / "model")
    config = write_demo(home, demo)
    moved = tmp_path / "elsewhere" / "config"
    moved.parent.mkdir()
    config.rename(moved)
    with pytest.raises(SpecError, match=r"trainer_config_node-1\.json: input\.pretrained_model\.path: "
                                         r"`\.\./demo/horizontal/chatglm/chatglm-demo` is relative.*--base-dir"):
        import_xfl(moved, environ={})
    spec = parse_job(yaml.safe_load(import_xfl(moved, base_dir=tmp_path / "site" / "python", environ={}).text)).spec
    assert spec.input.pretrained_model.path == str(tmp_path / "site" / "demo" / "horizontal" / "chatglm" /
                                                   "chatglm-demo")


# --- bad input: the message names the file or field, exit code 2, nothing written -----------------------


def run_import(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    code = main(["import-xfl", *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("breakage, expected", [
    (lambda c: (c / "trainer_config_node-2.json").write_text('[{"identity": '),
     r"trainer_config_node-2.json: not valid JSON"),
    (lambda c: (c / "trainer_config_node-1.json").unlink(), r"trainer_config_node-1.json: not found"),
    (lambda c: (c / "fed_conf.json").write_text('{"fed_info": {"trainer": {"node-1": "localhost"}}}'),
     r"fed_conf.json: fed_info.trainer.node-1: `localhost` is not host:port"),
    (lambda c: (c / "fed_conf.json").unlink(), r"no fed_conf.json, and \$__ENIGMA_FEDAPP_TASK_NETWORK__ is not set"),
    (lambda c: (c / "trainer_config_assist_trainer.json").write_text(
        (c / "trainer_config_assist_trainer.json").read_text().replace("horizontal_chatglm", "horizontal_linear")),
     r"trainer_config_assist_trainer.json: model_info.name is 'horizontal_linear'"),
], ids=["malformed-json", "missing-node-file", "bad-address", "no-network", "other-model"])
def test_bad_config_folders_name_the_file(capsys: pytest.CaptureFixture, tmp_path: Path, monkeypatch, breakage,
                                          expected: str) -> None:
    monkeypatch.delenv("__ENIGMA_FEDAPP_TASK_NETWORK__", raising=False)
    demo = next(d for d in DEMOS if d.name == "3party_lora")
    config = write_demo(write_xfl_home(tmp_path / "XFL", tmp_path / "model"), demo)
    breakage(config)
    out = tmp_path / "job.yaml"
    code, message = run_import(capsys, str(config), "-o", str(out))
    assert code == 2, message
    assert re.search(expected, message), message
    assert not out.exists()


def test_env_demo_with_a_malformed_network_variable(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                    monkeypatch) -> None:
    demo = next(d for d in DEMOS if d.env)
    config = write_demo(write_xfl_home(tmp_path / "XFL", tmp_path / "model"), demo)
    monkeypatch.setenv("__ENIGMA_FEDAPP_TASK_NETWORK__", '{"nodes": {"node-1": {}}}')
    code, message = run_import(capsys, str(config))
    assert code == 2 and "$__ENIGMA_FEDAPP_TASK_NETWORK__: not XFL's task network" in message
