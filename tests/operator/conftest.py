"""Fixtures of the operator's no-cluster tests: the bundled LoRA example, as a document and as a Job."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from fedtune_operator.jobs import Job
from support.children import make_job
from support.jobs import EXAMPLE


@pytest.fixture
def example() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text())


@pytest.fixture
def job(example) -> Job:
    return make_job(example)
