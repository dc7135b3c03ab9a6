"""checkov passes on the rendered chart and on what the operator creates for each example.

The checks skipped, each with its reason, are in .checkov.yaml at the repository root; any
other failed check fails these tests, naming the check and the resource.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedtune.spec import parse_job
from fedtune_operator.children import all_children, problems
from fedtune_operator.jobs import Job
from support.children import OPERATOR
from support.jobs import REPO, example_documents

from .test_chart import CHART, _helm

CONFIG = REPO / ".checkov.yaml"
# Jobs run in a namespace of their own (checkov flags the default one).
NAMESPACE = "fedtune-jobs"

# checkov pins old versions of packages the training stack shares, so it lives in an environment of its
# own (`make checkov`); FEDTUNE_CHECKOV names its executable, and once named it must be there.
CHECKOV = os.environ.get("FEDTUNE_CHECKOV") or shutil.which("checkov")
pytestmark = pytest.mark.skipif(
    CHECKOV is None, reason="checkov is not installed (make checkov, or set FEDTUNE_CHECKOV)")


def checkov(target: Path) -> list[str]:
    """Failed checks under `target` as `CHECK resource (file)` lines; the summary must show it ran."""
    assert CHECKOV is not None and Path(CHECKOV).exists(), f"FEDTUNE_CHECKOV={CHECKOV} does not exist"
    args = [CHECKOV, "--config-file", str(CONFIG), "-o", "json", "-d", str(target)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    try:
        report: Any = json.loads(result.stdout)
    except ValueError:
        raise AssertionError(f"checkov did not report ({result.returncode}):\n{result.stderr[-3000:]}") from None
    reports = report if isinstance(report, list) else [report]
    scanned = sum(rep.get("summary", {}).get("resource_count", 0) for rep in reports)
    assert scanned > 0, f"checkov scanned nothing: {report}"
    failed = []
    for rep in reports:
        for check in rep.get("results", {}).get("failed_checks", []):
            failed.append(f"{check['check_id']} {check['check_name']}: {check['resource']} ({check['file_path']})")
    return failed


def test_operator_manifests_for_every_example_pass(tmp_path) -> None:
    jobs = example_documents()
    assert len(jobs) >= 3
    for source, doc in jobs:
        doc["metadata"]["namespace"] = NAMESPACE
        job = Job(
            doc["metadata"]["name"], NAMESPACE, "0b5e6f0e-0000-0000-0000-000000000001", doc["spec"], parse_job(doc)
        )
        assert problems(job) == [], source
        children = all_children(job, "not-a-real-password", operator=OPERATOR)
        (tmp_path / f"{job.name}.yaml").write_text(yaml.safe_dump_all(children, sort_keys=False))
    failed = checkov(tmp_path)
    assert not failed, "checkov failed on the operator's manifests:\n" + "\n".join(failed)


@pytest.mark.parametrize("values", [[], ["watchNamespaces={team-a,team-b}"]], ids=["cluster-wide", "namespaced"])
def test_rendered_chart_passes(tmp_path, values) -> None:
    args = [_helm(), "template", "fedtune", str(CHART), "--namespace", "fedtune-system", "--kube-version", "1.34.0"]
    for value in values:
        args += ["--set", value]
    rendered = subprocess.run(args, capture_output=True, text=True, check=True, timeout=60).stdout
    (tmp_path / "chart.yaml").write_text(rendered)
    failed = checkov(tmp_path)
    assert not failed, "checkov failed on the chart:\n" + "\n".join(failed)
