"""What a run leaves behind and how the command line speaks: no secrets in the output, readable adapters,
`output.path` placeholders, certificates never silently replaced, levels, versions, exit codes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fedtune import __version__
from fedtune.cli import main
from support.jobs import PARTIES, write_job


def fedtune(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    try:
        code = main(list(args))
    except SystemExit as exit_:  # argparse: --help, --version, bad choices
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_version_help_and_log_levels(capsys: pytest.CaptureFixture) -> None:
    assert fedtune(capsys, "--version") == (0, f"fedtune {__version__}\n")
    code, text = fedtune(capsys, "--help")
    assert code == 0
    for line in ("0    success", "1    the job failed", "2    bad input", "124  fedtune run --timeout expired"):
        assert line in text
    code, text = fedtune(capsys, "--log-level", "chatty", "validate", "job.yaml")
    assert code == 2 and "invalid choice: 'CHATTY'" in text and "DEBUG" in text


def test_certs_are_never_replaced_silently(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    out = tmp_path / "ca"
    assert fedtune(capsys, "certs", "ca", "--out", str(out))[0] == 0
    key = (out / "ca.key").read_bytes()
    assert stat.S_IMODE((out / "ca.key").stat().st_mode) == 0o600
    code, text = fedtune(capsys, "certs", "ca", "--out", str(out))
    assert code == 2 and "ca.crt exists" in text and "--force" in text
    assert (out / "ca.key").read_bytes() == key
    party = tmp_path / "node-1"
    args = ("certs", "issue", "--ca", str(out), "--name", "node-1", "--out", str(party))
    assert fedtune(capsys, *args)[0] == 0
    cert = (party / "tls.crt").read_bytes()
    code, text = fedtune(capsys, *args)
    assert code == 2 and "tls.crt exists" in text and (party / "tls.crt").read_bytes() == cert
    assert fedtune(capsys, *args, "--force")[0] == 0
    assert (party / "tls.crt").read_bytes() != cert
    assert fedtune(capsys, "certs", "ca", "--out", str(out), "--force")[0] == 0
    assert (out / "ca.key").read_bytes() != key


def run_fedtune(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedtune", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


@pytest.mark.slow
def test_run_honours_output_path_and_leaves_nothing_secret(tmp_path: Path, tiny_model: Path) -> None:
    """No --output: spec.output.path decides. Afterwards: no key, no Redis config, readable adapters and summary,
    and the private folder of the run's secrets is gone from TMPDIR."""
    job = write_job(tmp_path / "job", tiny_model, name="poems", sizes=(8, 8, 8), epochs=1,
                    output={"path": "adapters/[JOB_ID]/[NODE_ID]"})
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    done = run_fedtune("--log-level", "warning", "run", str(job), env={"TMPDIR": str(scratch)})
    assert done.returncode == 0, done.stdout + done.stderr
    root = tmp_path / "job" / "adapters" / "poems"
    summary = json.loads((root / "summary.json").read_text())
    for party in PARTIES:
        assert sorted(p.name for p in (root / party).glob("checkpoint-*")) == ["checkpoint-0.5", "checkpoint-1"]
        assert summary["parties"][party]["output"] == str(root / party)
    written = [p for p in root.rglob("*") if p.is_file()]
    assert not [p for p in written if p.suffix in (".key", ".conf") or p.name == "tls.crt" or ".fedtune-state" in
                str(p)], written
    for path in written:
        assert b"requirepass" not in path.read_bytes(), path
    adapters = [p for p in written if "checkpoint-" in str(p)] + [root / "summary.json"]
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in adapters} == {"0o644"}
    assert list(scratch.iterdir()) == []
    log = (root / ".fedtune" / "logs" / "node-1.log").read_text()
    assert " INFO " not in log and "LoRA r=4" not in log  # --log-level reached the role


@pytest.mark.slow
def test_timeout_says_so(tmp_path: Path, tiny_model: Path) -> None:
    job = write_job(tmp_path / "job", tiny_model)
    done = run_fedtune("run", str(job), "--output", str(tmp_path / "out"), "--timeout", "1", env={})
    assert done.returncode == 124, done.stdout + done.stderr
    assert "timed out after 1 s (--timeout)" in done.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "timed out" in summary["error"]
