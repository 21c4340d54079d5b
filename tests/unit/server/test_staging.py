"""Staging sweep and budget (`flora_server.adapters.staging`), and the settings that bound
them and the connection limits."""

from __future__ import annotations

import os
import time

import pytest
from pydantic import ValidationError

from flora_server.adapters.staging import (
    StagingBudget,
    StagingFullError,
    StagingJanitor,
    sweep_stale,
)
from flora_server.cli import parse_settings
from flora_server.settings import Settings


def _file(path, size: int, age: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    t = time.time() - age
    os.utime(path, (t, t))


def test_sweep_removes_only_stale_staging_files(tmp_path):
    for name, size in ((".tmp-a", 10), (".put-b", 20), (".get-c", 30), (".uploads/.up-w-d", 40)):
        _file(tmp_path / name, size, age=100)
    _file(tmp_path / ".tmp-fresh", 5, age=1)
    _file(tmp_path / ".uploads/.up-fresh", 5, age=1)
    _file(tmp_path / "adapter.flora", 5, age=100)  # a stored adapter
    _file(tmp_path / ".uploads/other", 5, age=100)
    _file(tmp_path / "sub/.tmp-nested", 5, age=100)  # only the two staging directories
    (tmp_path / ".tmp-dir").mkdir()
    os.utime(tmp_path / ".tmp-dir", (0, 0))
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    _file(outside, 7, age=100)
    (tmp_path / ".tmp-link").symlink_to(outside)
    os.utime(tmp_path / ".tmp-link", (0, 0), follow_symlinks=False)

    result = sweep_stale(tmp_path, stale_seconds=50)

    assert (result.files, result.bytes) == (4, 100)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == [
        ".tmp-dir",
        ".tmp-fresh",
        ".tmp-link",
        ".uploads",
        ".uploads/.up-fresh",
        ".uploads/other",
        "adapter.flora",
        "sub",
        "sub/.tmp-nested",
    ]
    assert outside.read_bytes() == b"x" * 7  # a link is never followed
    assert sweep_stale(tmp_path / "missing", 50).files == 0


def test_janitor_sweeps_periodically(tmp_path):
    janitor = StagingJanitor(tmp_path, stale_seconds=1.0)
    assert janitor.period == 0.25
    janitor.start()
    try:
        _file(tmp_path / ".tmp-late", 3, age=0)
        deadline = time.monotonic() + 5
        while (tmp_path / ".tmp-late").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        janitor.stop()
    assert StagingJanitor(tmp_path, 3600).period == 300


def test_budget_holds_and_releases():
    budget = StagingBudget(100)
    a, b = budget.hold(), budget.hold()
    a.add(60)
    b.add(40)
    assert budget.used == 100
    with pytest.raises(StagingFullError, match="100 bytes"):
        b.add(1)
    assert budget.used == 100 and b.bytes == 40  # the refused chunk is not charged
    a.release()
    b.add(50)
    b.release()
    assert budget.used == 0


def test_connection_and_staging_settings(tmp_path):
    s = Settings(home=tmp_path)
    assert (s.header_timeout, s.keep_alive_timeout, s.probe_port) == (10.0, 5.0, None)
    assert s.metrics_public is False and s.max_staging_bytes >= s.max_upload_bytes
    with pytest.raises(ValidationError, match="probe_port must differ"):
        Settings(home=tmp_path, port=9000, probe_port=9000)
    with pytest.raises(ValidationError, match="max_staging_bytes"):
        Settings(home=tmp_path, max_upload_bytes=2000, max_staging_bytes=1000)
    with pytest.raises(ValidationError, match="header_timeout"):
        Settings(home=tmp_path, header_timeout=0)


def test_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("FLORA_HOME", str(tmp_path))
    s = parse_settings(["--metrics-key", "prom", "--probe-port", "8001", "--header-timeout", "2.5"])
    assert (s.metrics_keys, s.probe_port, s.header_timeout) == (["prom"], 8001, 2.5)
