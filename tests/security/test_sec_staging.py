"""Issue 14, item 7: crash leftovers. Staged upload parts (`.uploads/.up-*`) and temp files
(`.tmp-*`, the S3 scratch `.put-*` / `.get-*`) older than `--staging-stale-seconds` are gone
once a real server has started on the store, and later ones are swept while it runs; a file
still being written is kept. Uploads in progress together hold at most
`--max-staging-bytes`: past it an upload answers 507 with Retry-After."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from tiny import make_model_dir, running_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

STALE = 3.0
OLD = time.time() - 3600


def _plant(path: Path, size: int, mtime: float | None = OLD) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def _multipart_head(boundary: str) -> bytes:
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="adapter_id"\r\n\r\nslow\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="weights"; filename="w"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()


def _staged_bytes(uploads: Path) -> int:
    return sum(p.stat().st_size for p in uploads.glob(".up-weights-*") if p.exists())


def test_leftovers_swept_in_flight_kept_and_staging_space_bounded(tmp_path):
    model_dir = make_model_dir(tmp_path / "model")
    store = tmp_path / "store"
    leftovers = [
        _plant(store / ".uploads" / ".up-weights-crashed1", 300_000),
        _plant(store / ".uploads" / ".up-packed-crashed2", 1000),
        _plant(store / ".tmp-crashed3", 200_000),
        _plant(store / ".tmp-read-crashed4", 10),
        _plant(store / ".put-crashed5", 10),
        _plant(store / ".get-crashed6", 10),
    ]
    # Not staging: an old unrelated file and a hidden directory matching no pattern.
    unrelated = [_plant(store / "notes.txt", 10), _plant(store / ".uploads" / "keep.bin", 10)]
    # Another writer's upload in progress: touched every 0.3 s, never stale.
    in_flight = _plant(store / ".uploads" / ".up-weights-inflight", 100, mtime=None)
    writing = threading.Event()
    writing.set()

    def keep_writing() -> None:
        while writing.is_set():
            with in_flight.open("ab") as f:
                f.write(b"x")
            time.sleep(0.3)

    writer = threading.Thread(target=keep_writing, daemon=True)
    writer.start()
    flags = [
        "--staging-stale-seconds", str(STALE),
        "--max-upload-bytes", "200000", "--max-staging-bytes", "300000",
    ]  # fmt: skip
    try:
        with running_server(model_dir, store, *flags) as server:
            assert [p for p in leftovers if p.exists()] == []
            assert all(p.exists() for p in unrelated)
            assert in_flight.exists()
            # Once its writer stops, the periodic sweep (every STALE/4 s) takes it too.
            writing.clear()
            writer.join()
            deadline = time.monotonic() + STALE + 3
            while in_flight.exists():
                assert time.monotonic() < deadline, "a stale file outlived the periodic sweep"
                time.sleep(0.2)
            _check_staging_budget(server.url, store / ".uploads")
            assert server.proc.poll() is None, server.log()
            assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
    finally:
        writing.clear()


def _check_staging_budget(url: str, uploads: Path) -> None:
    """One upload holds 150 kB of the 300 kB: a second one of 180 kB is refused with 507
    while it streams; once the first is abandoned, the same upload is read to the end (and
    refused for its content, 422)."""
    parts = urlsplit(url)
    boundary = "b0undary"
    head = _multipart_head(boundary)
    held = socket.create_connection((parts.hostname, parts.port), timeout=10)
    try:
        held.sendall(
            b"POST /v1/adapters HTTP/1.1\r\nHost: x\r\nContent-Length: 199000\r\n"
            b"Content-Type: multipart/form-data; boundary=" + boundary.encode() + b"\r\n\r\n"
        )
        held.sendall(head + b"\0" * 150_000)
        deadline = time.monotonic() + 10
        while _staged_bytes(uploads) < 140_000:
            assert time.monotonic() < deadline, "the held upload was not staged"
            time.sleep(0.05)
        second = {
            "config": ("adapter_config.json", b"{}"),
            "weights": ("adapter.safetensors", b"\0" * 180_000),
        }
        r = httpx.post(f"{url}/v1/adapters", data={"adapter_id": "b"}, files=second, timeout=30)
        assert r.status_code == 507, r.text
        assert r.json()["error"]["type"] == "insufficient_storage"
        assert r.headers["retry-after"] == "5"
    finally:
        held.close()
    deadline = time.monotonic() + 10
    while True:
        r = httpx.post(f"{url}/v1/adapters", data={"adapter_id": "b"}, files=second, timeout=30)
        if r.status_code != 507:
            break
        assert time.monotonic() < deadline, "the abandoned upload never released its space"
        time.sleep(0.1)
    assert r.status_code == 422, r.text
    assert _staged_bytes(uploads) == 0
