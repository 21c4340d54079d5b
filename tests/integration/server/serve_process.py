"""A real `flora-serve` process on 127.0.0.1 for integration tests (vision and encoder)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

T = 120  # seconds per HTTP call: the test machines are shared and slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flora_serve_command() -> list[str]:
    """The installed `flora-serve` console script of this interpreter's environment."""
    script = Path(sys.executable).parent / "flora-serve"
    return [str(script)] if script.exists() else [sys.executable, "-m", "flora_server.cli"]


@contextlib.contextmanager
def running_server(args: list[str], *, ready_within: float = 300) -> Iterator[str]:
    """Start `flora-serve ARGS --port P`, wait for /ready, yield its URL, stop it (SIGTERM)."""
    port = free_port()
    env = {**os.environ, "FLORA_LOG_LEVEL": "warning"}
    cmd = [*flora_serve_command(), *args, "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_within
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read().decode() if proc.stdout else ""
                raise AssertionError(f"flora-serve exited {proc.returncode}: {out[-4000:]}")
            try:
                r = httpx.get(f"{url}/ready", timeout=2)
                if r.status_code == 200:
                    break
                assert "start-up failed" not in r.text, r.text
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"server not ready after {ready_within} s"
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
