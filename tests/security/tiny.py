"""A tiny random Llama (2 layers, hidden 64, character tokenizer) saved as a HF directory and
served by a real `flora-serve` process: lifecycle, overload and leak tests run against the
real app, uvicorn and engine in seconds."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx


def server_fixtures():
    """The tiny-engine helpers of tests/unit/server (make_tiny_llama, make_char_tokenizer,
    make_flora_adapter, DictSource, ...); conftest.py puts that directory on sys.path."""
    import tiny_engine

    return tiny_engine


def make_model_dir(path: Path) -> Path:
    fx = server_fixtures()
    fx.make_tiny_llama().save_pretrained(path)
    fx.make_char_tokenizer().save_pretrained(path)
    return path


def make_adapter_dirs(
    model_dir: Path,
    out: Path,
    seeds: list[int],
    rank: int = 2,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    prefix: str = "adapter",
) -> list[Path]:
    """FLoRA adapters for the model in `model_dir` (fingerprint from the saved weights, as the
    server computes it), with random non-zero cores so they change the output."""
    import torch

    from flora import FloraConfig, adapter_layers, inject
    from flora import models as zoo
    from flora.adapter import save_adapter

    loaded = zoo.load(str(model_dir))
    model = inject(loaded.model, FloraConfig(target_modules=list(targets), rank=rank))
    dirs = []
    for seed in seeds:
        torch.manual_seed(seed)
        with torch.no_grad():
            for _, layer in adapter_layers(model):
                layer.core.normal_(0.0, 0.5)
        dirs.append(save_adapter(model, out / f"{prefix}-{seed}", base_model_id="tiny"))
    return dirs


def upload_files(directory: Path) -> dict[str, tuple[str, bytes]]:
    return {
        "config": ("adapter_config.json", (directory / "adapter_config.json").read_bytes()),
        "weights": ("adapter.safetensors", (directory / "adapter.safetensors").read_bytes()),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)


def start_server(
    model_dir: Path, store: Path, *flags: str, env: dict | None = None
) -> ServerProcess:
    port = free_port()
    log_path = store.parent / f"server-{port}.log"
    cmd = [
        sys.executable, "-m", "flora_server.cli", "--model", str(model_dir),
        "--port", str(port), "--adapter-store", str(store), "--log-level", "warning", *flags,
    ]  # fmt: skip
    full_env = {**os.environ, "FLORA_HOME": str(store.parent / "home"), **(env or {})}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, server.log()
        with contextlib.suppress(httpx.TransportError):
            r = httpx.get(f"{server.url}/ready", timeout=2)
            if r.status_code == 200:
                return server
            assert "start-up failed" not in r.text, r.text
        assert time.monotonic() < deadline, "server not ready after 90 s\n" + server.log()
        time.sleep(0.1)


@contextlib.contextmanager
def running_server(model_dir: Path, store: Path, *flags: str, **kw) -> Iterator[ServerProcess]:
    server = start_server(model_dir, store, *flags, **kw)
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.signal(signal.SIGKILL)
            server.proc.wait(10)


def api_error(response) -> dict:
    """The error of either shape as ``{"type", "message", "param"}``: the project's nested
    one, or TGI's flat one on the TGI routes (``{"error", "error_type", "param"}``)."""
    body = response.json()
    if isinstance(body["error"], str):
        return {"type": body["error_type"], "message": body["error"], "param": body.get("param")}
    return body["error"]
