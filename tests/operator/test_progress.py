"""Round and loss are read from the runtime's job state in a real redis-server, and never block."""

from __future__ import annotations

import socket
import time

from fedtune.federation.jobstate import JobState
from fedtune_operator.progress import read_progress


def test_reads_round_and_loss_from_redis(redis_server) -> None:
    state = JobState.connect(redis_server.address, redis_server.password, "poems-lora")
    state.init(5, {"assist_trainer": "assist_trainer", "node-1": "label_trainer"})
    state.put_global(2, b"adapter")
    state.update_party("node-1", round=2, step=40, loss=1.5)
    state.update_party("assist_trainer", round=2, step=40, loss=0.5)

    progress = read_progress(redis_server.address, redis_server.password, "poems-lora")
    assert progress is not None
    assert (progress.round, progress.rounds, progress.loss) == (2, 5, 1.0)
    assert progress.parties["node-1"]["step"] == 40
    assert progress.dropouts == {} and progress.privacy is None


def test_reads_dropouts_and_epsilon(redis_server) -> None:
    state = JobState.connect(redis_server.address, redis_server.password, "poems-dp")
    state.init(5, {"assist_trainer": "assist_trainer", "node-1": "label_trainer", "node-2": "label_trainer"})
    state.set_split(1, ["node-1"], ["node-2"])
    state.set_json("privacy", {"epsilon": 3.5, "delta": 1e-5, "rounds": 1})
    progress = read_progress(redis_server.address, redis_server.password, "poems-dp")
    assert progress is not None
    assert progress.dropouts == {"1": ["node-2"]} and progress.privacy["epsilon"] == 3.5


def test_wrong_password_or_no_server_gives_none_quickly(redis_server) -> None:
    assert read_progress(redis_server.address, "wrong", "poems-lora") is None
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    assert read_progress(f"127.0.0.1:{port}", "pw", "poems-lora", timeout_s=0.5) is None
    assert time.monotonic() - started < 2


def test_a_silent_server_does_not_block_longer_than_the_timeout() -> None:
    with socket.socket() as server:  # accepts connections, never answers
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        started = time.monotonic()
        assert read_progress(f"127.0.0.1:{server.getsockname()[1]}", "pw", "j", timeout_s=0.3) is None
        assert time.monotonic() - started < 1.5
