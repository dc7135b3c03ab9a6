"""A role's Prometheus metrics: served when a port is given, and never in the job's way; JSON logs."""

from __future__ import annotations

import json
import logging
import socket
import urllib.request

import pytest

from fedtune import logs, roles
from fedtune.federation import metrics
from fedtune.local.launcher import free_port


def test_a_role_serves_its_own_series(monkeypatch) -> None:
    port = free_port()
    monkeypatch.setenv(roles.METRICS_PORT_ENV, str(port))
    assert metrics.serve("node-7")
    metrics.mine(metrics.ROUND).set(3)
    metrics.mine(metrics.TRAIN_LOSS).set(1.25)
    metrics.mine(metrics.BYTES_SENT).inc(4096)
    with metrics.timed(metrics.mine(metrics.SECAGG_SECONDS, step="protect")):
        pass
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'fedtune_round{party="node-7"} 3.0' in text
    assert 'fedtune_train_loss{party="node-7"} 1.25' in text
    assert 'fedtune_sent_bytes_total{party="node-7"} 4096.0' in text
    assert 'fedtune_secure_aggregation_seconds_count{party="node-7",step="protect"} 1.0' in text


def test_a_port_that_cannot_be_served_is_logged_and_left(caplog) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.WARNING, logger="fedtune.federation.metrics"):
            assert metrics.serve("node-1", port) is False
    assert f"cannot serve on port {port}" in caplog.text
    metrics.mine(metrics.ROUND).set(1)  # recording goes on regardless


def test_no_port_no_server(monkeypatch) -> None:
    monkeypatch.delenv(roles.METRICS_PORT_ENV, raising=False)
    assert metrics.serve("node-1") is False
    monkeypatch.setenv(roles.METRICS_PORT_ENV, "not-a-port")
    assert metrics.serve("node-1") is False


def test_json_logs_are_one_object_per_line() -> None:
    formatter = logs.JsonFormatter("node-1")
    record = logging.LogRecord("fedtune.federation.party", logging.WARNING, __file__, 1, "round %d: %s", (2, "slow"),
                               None)
    line = json.loads(formatter.format(record))
    assert line["level"] == "WARNING" and line["logger"] == "fedtune.federation.party" and line["who"] == "node-1"
    assert line["message"] == "round 2: slow" and line["time"].endswith("Z")
    with pytest.raises(ValueError, match="FEDTUNE_LOG_FORMAT=yaml"):
        logs.setup("x", "INFO", "yaml")
