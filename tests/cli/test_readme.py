"""The README tells the truth: every `fedtune` command it shows parses with the real command line (the
subcommand and every flag exist, the values have the right types), every YAML block is valid YAML, and
every whole job it shows validates against the spec."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from fedtune.cli import build_parser
from fedtune.spec import API_VERSION, parse_job

README = Path(__file__).resolve().parents[2] / "README.md"
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>\w*)\n(?P<body>.*?)^(?P=indent)```", re.M | re.S)


def blocks(lang: str) -> list[tuple[int, str]]:
    """(line, text) of each fenced block of that language, indentation removed."""
    text = README.read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        if match.group("lang") == lang:
            indent = len(match.group("indent"))
            body = "\n".join(line[indent:] for line in match.group("body").splitlines())
            found.append((text.count("\n", 0, match.start()) + 1, body))
    return found


def commands() -> list[tuple[int, list[str]]]:
    """Each `fedtune ...` command of the shell blocks, continuation lines joined, comments dropped."""
    found = []
    for line_no, body in blocks("shell"):
        for line in body.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["fedtune"]:
                found.append((line_no, [re.sub(r"\$\{?\w+\}?", "X", w) for w in words[1:]]))
    return found


def test_the_readme_shows_commands_and_jobs() -> None:
    assert len(commands()) >= 15 and len(blocks("yaml")) >= 5  # the extraction itself works


@pytest.mark.parametrize("line, argv", commands(), ids=lambda v: str(v) if isinstance(v, int) else " ".join(v[:2]))
def test_every_command_parses(line: int, argv: list[str]) -> None:
    try:
        build_parser().parse_args(argv)
    except SystemExit as exit_:
        pytest.fail(f"README.md:{line}: `fedtune {' '.join(argv)}` does not parse (exit {exit_.code})")


@pytest.mark.parametrize("line, body", blocks("yaml"), ids=lambda v: str(v) if isinstance(v, int) else "")
def test_every_yaml_block_is_yaml_and_every_job_validates(line: int, body: str) -> None:
    try:
        documents = list(yaml.safe_load_all(body))
    except yaml.YAMLError as err:
        pytest.fail(f"README.md:{line}: not valid YAML: {err}")
    for document in documents:
        if isinstance(document, dict) and document.get("apiVersion") == API_VERSION:
            parse_job(document, f"README.md:{line}")  # raises SpecError naming the field


def test_a_wrong_flag_is_caught() -> None:
    """The check can fail: a flag the command line does not have."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "job.yaml", "--no-such-flag"])
