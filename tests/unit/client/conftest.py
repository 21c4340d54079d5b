"""Fixtures for the client tests: one stub server per session, state reset per test."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from flora_stub_server import StubState, serve

from flora_client.retry import RetryPolicy


@pytest.fixture(scope="session")
def _stub_session() -> Iterator[tuple[StubState, str]]:
    state = StubState()
    with serve(state) as url:
        yield state, url


@pytest.fixture
def stub(_stub_session: tuple[StubState, str]) -> StubState:
    state, _ = _stub_session
    state.reset()
    return state


@pytest.fixture
def stub_url(_stub_session: tuple[StubState, str], stub: StubState) -> str:
    return _stub_session[1]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's FLORA_URL / FLORA_API_KEY must not leak into tests.
    monkeypatch.delenv("FLORA_URL", raising=False)
    monkeypatch.delenv("FLORA_API_KEY", raising=False)


@pytest.fixture
def no_jitter() -> RetryPolicy:
    """Retries with rand() == 0: backoff 0, so delays equal Retry-After exactly."""
    return RetryPolicy(max_retries=3, rand=lambda: 0.0)


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    """A fake adapter directory (the stub does not parse safetensors)."""
    path = tmp_path / "my-adapter"
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"format_version": 1, "method": "flora"}))
    (path / "adapter.safetensors").write_bytes(bytes(range(256)) * 40)
    return path
