"""Fixtures every test folder shares: a real redis-server and tiny models built from the bundled poems."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.jobs import POEMS
from support.threads import torch_threads


@pytest.fixture(scope="session", autouse=True)
def token_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Jobs started by the tests cache their tokenised data here, not in the user's cache folder."""
    from fedtune.roles import CACHE_DIR_ENV

    folder = tmp_path_factory.mktemp("token-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_DIR_ENV, str(folder))
        yield folder


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tests that train in this process (torch imported) train on one thread: the tiny model is faster so,
    and spinning threads crawl on a busy 2-core machine. A module-scoped fixture whose results a test
    compares bit for bit takes `torch_threads(1)` itself (it is set up before this one)."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    with torch_threads(1):
        yield


@pytest.fixture
def redis_server() -> Iterator:
    from fedtune.local.launcher import RedisServer

    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedtune.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-glm", [POEMS])


@pytest.fixture(scope="session")
def remote_chatglm(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A checkpoint that carries its own ChatGLM-style modelling code (trust_remote_code)."""
    from support.remote_model import build_remote_chatglm

    return build_remote_chatglm(tmp_path_factory.mktemp("models") / "tiny-chatglm", tiny_model)
