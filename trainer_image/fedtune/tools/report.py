"""`fedtune report OUT`: what a run learned, to look at.

Reads `OUT/summary.json` (what `fedtune run` writes): each party's training loss by step and the
global adapter's loss on the valsets by round. Writes into `OUT/report/`:

- `training-loss.png`: each party's training loss against its fraction of training (parties take
  different numbers of steps; their rounds line up by fraction), the rounds marked;
- `eval-loss.png`: the global adapter's loss on each party's valset, and over all of them, by
  round (only when some party has a valset);
- `index.html`: one self-contained page (the images embedded) with a table per party; a party
  whose valset loss rose from the first evaluated round to the last is flagged.

matplotlib (the `report` extra) is imported here only.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedtune.files import write_atomic
from fedtune.spec import SpecError

REPORT_DIR = "report"
# The losses' names, as summary.json's `loss` defines them (the console prints the same numbers).
TRAIN_LOSS = "training loss (mean cross-entropy per answer token)"
EVAL_LOSS = "valset loss (mean cross-entropy per answer token)"
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
DASHES = ("-", "--", "-.", ":")


def load_summary(output: Path) -> dict[str, Any]:
    path = output / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"{path}: not found: is {output} the output folder of a `fedtune run`?") from None
    except (OSError, json.JSONDecodeError) as err:
        raise SpecError(f"{path}: unreadable: {err}") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("parties"), dict):
        raise SpecError(f"{path}: not a fedtune run summary (no `parties`)")
    return summary


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise SpecError("fedtune report draws with matplotlib, which is not installed: "
                        "pip install 'fedtune[report]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _draw(draw: Callable[[Any], None], **labels: str) -> bytes:
    """One figure as PNG bytes: `draw(axes)` plots, `labels` are the axes' xlabel, ylabel, title."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4))
    try:
        draw(axes)
        axes.set(**labels)
        axes.legend()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        return buffer.getvalue()
    finally:
        plt.close(figure)


def training_plot(summary: dict[str, Any]) -> bytes:
    def draw(axes: Any) -> None:
        for name, party in summary["parties"].items():
            losses = party.get("losses") or []
            if losses and party.get("max_steps"):
                axes.plot([step / party["max_steps"] for step, _ in losses], [loss for _, loss in losses], label=name)
        rounds = summary.get("rounds") or 0
        for k in range(1, rounds + 1):
            axes.axvline(k / rounds, color="grey", linewidth=0.5, linestyle=":")

    return _draw(draw, xlabel="fraction of each party's training (dotted: aggregation rounds)",
                 ylabel=TRAIN_LOSS, title=f"job {summary.get('job', '')}: training loss")


def eval_plot(summary: dict[str, Any]) -> bytes | None:
    if not any(p.get("eval") for p in summary["parties"].values()):
        return None
    return _draw(lambda axes: draw_eval(axes, summary), xlabel="round (0: the initial adapter)", ylabel=EVAL_LOSS,
                 title=f"job {summary.get('job', '')}: the global adapter on the valsets")


def draw_eval(axes: Any, summary: dict[str, Any]) -> None:
    """The valset losses by round: over all valsets underneath, wide and pale, and each party's on top, with a
    marker and dash of its own, so that parties whose losses coincide stay visible; whole rounds on the axis."""
    from matplotlib.ticker import MaxNLocator

    overall = summary.get("eval_loss") or []
    if overall:
        axes.plot([e["round"] for e in overall], [e["loss"] for e in overall], color="black", linewidth=5,
                  alpha=0.25, label="all valsets", zorder=1)
    evaluated = [(name, p["eval"]) for name, p in summary["parties"].items() if p.get("eval")]
    for i, (name, points) in enumerate(evaluated):
        axes.plot([e["round"] for e in points], [e["loss"] for e in points], label=name, zorder=2,
                  marker=MARKERS[i % len(MARKERS)], markersize=9 - i % 4, markerfacecolor="none",
                  linestyle=DASHES[i % len(DASHES)])
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def rose(party: dict[str, Any]) -> bool:
    """The valset loss at the last evaluated round is above the first's."""
    evaluated = party.get("eval") or []
    return len(evaluated) > 1 and evaluated[-1]["loss"] > evaluated[0]["loss"]


def _row(name: str, party: dict[str, Any]) -> str:
    losses = [loss for _, loss in party.get("losses") or []]
    evaluated = party.get("eval") or []
    train = f"{losses[0]:.4f} &rarr; {losses[-1]:.4f}" if losses else "&ndash;"
    valset = f"{evaluated[0]['loss']:.4f} &rarr; {evaluated[-1]['loss']:.4f}" if evaluated else "no valset"
    flag = ' <strong class="rose">rose</strong>' if rose(party) else ""
    cells = [html.escape(name), html.escape(str(party.get("role", ""))), html.escape(str(party.get("state", ""))),
             str(party.get("samples", "")), str(party.get("max_steps", "")), train, valset + flag]
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def page(summary: dict[str, Any], images: dict[str, bytes]) -> str:
    embedded = "".join(
        f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{html.escape(title)}</figcaption></figure>"
        for title, png in images.items())
    flagged = [n for n, p in summary["parties"].items() if rose(p)]
    warning = (f"<p class=\"rose\">The valset loss rose at {html.escape(', '.join(flagged))}: the global adapter "
               "fits those parties' data worse at the end than at the start.</p>") if flagged else ""
    rows = "".join(_row(name, party) for name, party in summary["parties"].items())
    error = f"<p>error: {html.escape(summary['error'])}</p>" if summary.get("error") else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fedtune report: {html.escape(str(summary.get("job", "")))}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:60em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}.rose{{color:#b00}}img{{max-width:100%}}</style>
</head><body>
<h1>Job {html.escape(str(summary.get("job", "")))}: {html.escape(str(summary.get("phase", "")))}</h1>
<p>{summary.get("rounds", 0)} rounds in {summary.get("wall_s", 0):.1f} s.</p>{error}{warning}
<table><tr><th>party</th><th>role</th><th>state</th><th>samples</th><th>steps</th><th>training loss</th>
<th>valset loss (round 0 &rarr; last)</th></tr>{rows}</table>
{embedded}
</body></html>
"""


def write_report(output: Path, dest: Path | None = None) -> list[Path]:
    """The report of the run in `output`, written to `dest` (default `output/report/`); the files written."""
    summary = load_summary(output)
    dest = dest or output / REPORT_DIR
    images = {"training-loss.png": training_plot(summary)}
    evaluated = eval_plot(summary)
    if evaluated is not None:
        images["eval-loss.png"] = evaluated
    written = []
    for name, png in images.items():
        write_atomic(dest / name, png)
        written.append(dest / name)
    titles = {"training-loss.png": "training loss by party", "eval-loss.png": "the global adapter on the valsets"}
    write_atomic(dest / "index.html", page(summary, {titles[n]: png for n, png in images.items()}))
    return [*written, dest / "index.html"]
