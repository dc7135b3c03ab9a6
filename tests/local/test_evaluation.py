"""Held-out evaluation and the report: each party's valset loss of every round's global adapter, in the job state,
summary.json and the resource's status; `fedtune report` draws it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.cli import main
from fedtune.federation.jobstate import JobState
from support.jobs import PARTIES, run_cli, write_job, write_share


def fedtune(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_job_state_averages_each_rounds_valsets_by_their_size(redis_server) -> None:
    state = JobState.connect(redis_server.address, redis_server.password, "j")
    state.init(2, {"assist_trainer": "assist_trainer", "node-1": "label_trainer"})
    state.put_eval(0, "assist_trainer", 2.0, 10)
    state.put_eval(0, "node-1", 4.0, 30)
    state.put_eval(2, "node-1", 1.0, 30)
    assert state.snapshot().eval_loss == [{"round": 0, "loss": 3.5}, {"round": 2, "loss": 1.0}]


SUMMARY = {
    "job": "poems", "phase": "Succeeded", "error": "", "rounds": 2, "wall_s": 12.5,
    "eval_loss": [{"round": 0, "loss": 3.0}, {"round": 1, "loss": 2.5}, {"round": 2, "loss": 2.2}],
    "parties": {
        "node-1": {"role": "label_trainer", "state": "succeeded", "samples": 8, "max_steps": 4,
                   "losses": [[1, 3.1], [2, 2.9], [3, 2.6], [4, 2.4]],
                   "eval": [{"round": 0, "loss": 3.0, "samples": 4}, {"round": 1, "loss": 2.4, "samples": 4},
                            {"round": 2, "loss": 2.0, "samples": 4}]},
        "node-2": {"role": "label_trainer", "state": "succeeded", "samples": 4, "max_steps": 2,
                   "losses": [[1, 3.0], [2, 2.8]],
                   "eval": [{"round": 0, "loss": 3.0, "samples": 4}, {"round": 1, "loss": 2.6, "samples": 4},
                            {"round": 2, "loss": 3.3, "samples": 4}]},
    },
}


def test_report_draws_the_curves_and_flags_a_valset_loss_that_rose(capsys: pytest.CaptureFixture,
                                                                      tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text(json.dumps(SUMMARY))
    code, output = fedtune(capsys, "report", str(tmp_path))
    assert code == 0, output
    report = tmp_path / "report"
    for name in ("training-loss.png", "eval-loss.png"):
        assert (report / name).read_bytes().startswith(b"\x89PNG"), name
    page = (report / "index.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2 and "http" not in page  # self-contained
    assert "The valset loss rose at node-2" in page and "3.0000 &rarr; 2.0000" in page


def test_eval_lines_that_coincide_stay_apart_and_rounds_are_whole() -> None:
    from fedtune.tools.report import _pyplot, draw_eval

    same = {**SUMMARY, "parties": {name: {**SUMMARY["parties"]["node-1"]} for name in ("node-1", "node-2", "node-3")}}
    figure, axes = _pyplot().subplots()
    try:
        draw_eval(axes, same)
        figure.canvas.draw()
        lines = {line.get_label(): line for line in axes.get_lines()}
        parties = [lines[name] for name in ("node-1", "node-2", "node-3")]
        assert len({(line.get_marker(), line.get_linestyle()) for line in parties}) == 3  # each its own look
        assert all(line.get_zorder() > lines["all valsets"].get_zorder() for line in parties)
        ticks = [t for t in axes.get_xticks() if axes.get_xlim()[0] <= t <= axes.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    finally:
        _pyplot().close(figure)


def test_report_of_a_folder_without_a_run(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, output = fedtune(capsys, "report", str(tmp_path))
    assert code == 2 and f"{tmp_path / 'summary.json'}: not found" in output
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "summary.json").write_text("{}")
    code, output = fedtune(capsys, "report", str(tmp_path))
    assert code == 2 and "not a fedtune run summary" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


@pytest.mark.slow
def test_every_party_evaluates_every_round_on_its_valset(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                         tiny_model: Path) -> None:
    folder = tmp_path / "job"
    folder.mkdir()
    for party in PARTIES:
        (folder / f"val-{party}").mkdir()
    valsets = {p: write_share(folder / f"val-{p}", 2 - i, 4) for i, p in enumerate(PARTIES)}
    overrides = {p: {"valset": [{"path": str(path)}]} for p, path in valsets.items()}
    job = write_job(folder, tiny_model, sizes=(8, 8, 8), epochs=2, party_overrides=overrides)
    out = tmp_path / "out"
    done = run_cli("run", str(job), "--output", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    for party in PARTIES:
        evaluated = summary["parties"][party]["eval"]
        assert [e["round"] for e in evaluated] == [0, 1, 2] and all(e["samples"] == 4 for e in evaluated)
    assert [e["round"] for e in summary["eval_loss"]] == [0, 1, 2]
    for round_ in range(3):  # the same global adapter: the job's loss is the parties' mean (equal valset sizes)
        losses = [summary["parties"][p]["eval"][round_]["loss"] for p in PARTIES]
        assert summary["eval_loss"][round_]["loss"] == pytest.approx(sum(losses) / 3)
    assert all(f"(valset {summary['parties'][p]['eval'][0]['loss']:.3f} -> " in done.stdout for p in PARTIES)
    code, output = fedtune(capsys, "report", str(out))
    assert code == 0 and str(out / "report" / "index.html") in output and (out / "report" / "eval-loss.png").exists()
