"""Shared pieces of the server-level benchmarks (items 6 and 7): a real `flora-serve` on
127.0.0.1, random FLoRA adapters for its base, uploads over HTTP, the server's RSS.

The adapters are made as the integration tests make them: ``flora.inject`` on the same base
the server loads (so the saved fingerprint matches), random non-zero cores, and
``flora.adapter.save_adapter`` to a single-file archive, uploaded to ``POST /v1/adapters``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

DEFAULT_MODEL = "smollm2-135m-instruct"
HTTP_TIMEOUT = 120.0  # seconds per call: the machine is shared and slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (psutil when installed, else /proc/PID/status VmRSS)."""
    try:
        import psutil
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for pid {pid}") from None
    return int(psutil.Process(pid).memory_info().rss)


def nearest_rank(values: Sequence[float], q: float) -> float:
    """The q-quantile by nearest rank: the ceil(q n)-th smallest value."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def percentiles(
    values: Sequence[float], qs: Sequence[float] = (0.50, 0.99)
) -> dict[str, float | int | None]:
    """Count, the nearest-rank quantiles `qs` (keys p50, p99, ...), mean and max; None
    when empty."""
    keys = [f"p{round(q * 100)}" for q in qs]
    if not values:
        return {"n": 0, **dict.fromkeys(keys), "mean": None, "max": None}
    quantiles = {k: nearest_rank(values, q) for k, q in zip(keys, qs, strict=True)}
    return {"n": len(values), **quantiles, "mean": statistics.fmean(values), "max": max(values)}


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def rss(self) -> int:
        return rss_bytes(self.proc.pid)


@contextlib.contextmanager
def running_server(
    model: str, workdir: Path, *flags: str, ready_within: float = 300
) -> Iterator[Server]:
    """`flora-serve --model MODEL --host 127.0.0.1 --port P --adapter-store WORKDIR/store
    FLAGS`, waited for on /ready, stopped (SIGTERM, then SIGKILL) on exit. FLORA_HOME stays
    the user's, so the converted base model is reused."""
    port = free_port()
    log_path = workdir / f"server-{port}.log"
    cmd = [
        sys.executable, "-m", "flora_server.cli", "--model", model, "--host", "127.0.0.1",
        "--port", str(port), "--adapter-store", str(workdir / "store"),
        "--log-level", "warning", *flags,
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    server = Server(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + ready_within
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"flora-serve exited {proc.returncode}: {server.log_tail()}")
            with contextlib.suppress(httpx.TransportError):
                r = httpx.get(f"{server.url}/ready", timeout=2)
                if r.status_code == 200:
                    break
                if "start-up failed" in r.text:
                    raise RuntimeError(r.text)
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {ready_within} s: {server.log_tail()}")
            time.sleep(0.3)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def make_adapters(
    model: str,
    out: Path,
    count: int,
    *,
    rank: int = 8,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    seed: int = 0,
) -> list[Path]:
    """``count`` FLoRA archives for base ``model`` (zoo name or directory): shared random
    factors per target (one injection), a different random core N(0, 0.5) per adapter, so
    each one changes the output. The base is fingerprinted once (``adapter_from_model``)
    and only the core tensors change between saves: fingerprinting per save costs about
    0.4 s for SmolLM2. Returns the ``.flora`` paths."""
    import dataclasses

    import torch

    from flora import FloraConfig, inject
    from flora import models as zoo
    from flora.adapter import save_adapter
    from flora.adapter.io import adapter_from_model

    base = zoo.load(model).model
    injected = inject(base, FloraConfig(target_modules=list(targets), rank=rank))
    template = adapter_from_model(injected, model)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(count):
        tensors = {
            k: (torch.randn(v.shape, generator=gen, dtype=v.dtype) * 0.5)
            if k.endswith(".core")
            else v
            for k, v in template.tensors.items()
        }
        adapter = dataclasses.replace(template, tensors=tensors)
        paths.append(save_adapter(adapter, out / f"a{i:04d}.flora"))
    return paths


async def upload_all(
    url: str, ids: Sequence[str], paths: Sequence[Path], concurrency: int = 4
) -> dict[str, int]:
    """Upload each archive as ``ids[i]``; returns counts by HTTP status (201 expected)."""
    counts: dict[str, int] = {}
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT) as client:

        async def one(adapter_id: str, path: Path) -> None:
            async with sem:
                r = await client.post(
                    f"{url}/v1/adapters",
                    data={"adapter_id": adapter_id},
                    files={"archive": (path.name, path.read_bytes())},
                )
            counts[str(r.status_code)] = counts.get(str(r.status_code), 0) + 1

        await asyncio.gather(*(one(a, p) for a, p in zip(ids, paths, strict=True)))
    return counts


def scratch_dir(prefix: str) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=prefix)


def cli(
    doc: str,
    run: Callable[[Any], dict],
    quick: Callable[[str], Any],
    full: Callable[[str], Any],
    quick_help: str,
    argv: list[str] | None = None,
) -> int:
    """The command line of a server-level bench item: ``--quick-run`` (``quick(model)``,
    a smoke test) or the full config ``full(model)``; prints ``run(config)`` as JSON."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick-run", action="store_true", help=quick_help)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="zoo name or model directory")
    args = parser.parse_args(argv)
    cfg = quick(args.model) if args.quick_run else full(args.model)
    print(json.dumps(run(cfg), indent=2, default=float))
    return 0
