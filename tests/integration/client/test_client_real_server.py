"""The SDK and the `flora` CLI against the real server (`python -m flora_server.cli`, uvicorn
on 127.0.0.1) with SmolLM2-135M and a real FLoRA adapter (random non-zero cores on
q_proj/v_proj, made here with `flora.inject` + `save_adapter`, so it changes greedy output).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flora_client import (
    AsyncClient,
    Client,
    Conflict,
    FloraTimeoutError,
    NotFound,
    ValidationError,
)
from flora_client.cli import app

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

BASE = "smollm2-135m-instruct"
PROMPT = "The capital of France is"
MAX_NEW = 12


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _make_adapter(out: Path, seed: int) -> Path:
    import torch

    from flora import FloraConfig, adapter_layers, inject
    from flora import models as zoo
    from flora.adapter import save_adapter

    model = inject(zoo.load(BASE).model, FloraConfig(target_modules=["q_proj", "v_proj"], rank=4))
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.core.normal_(0.0, 0.5)
    return Path(save_adapter(model, out, base_model_id=BASE))


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_adapter(tmp_path_factory.mktemp("made") / "alpha", seed=1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("srv")
    port = _free_port()
    cmd = [
        sys.executable, "-m", "flora_server.cli", "--model", BASE, "--port", str(port),
        "--adapter-store", str(work / "store"), "--max-new-tokens", "64",
        "--log-level", "warning",
    ]  # fmt: skip
    log = (work / "server.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        with Client(url) as client:
            deadline = time.monotonic() + 300
            # Short waits in a loop, so a server that died is noticed at once.
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    client.wait_ready(timeout=5)
                    break
                except FloraTimeoutError:
                    continue
            assert proc.poll() is None, (work / "server.log").read_text()[-4000:]
            assert client.ready(), "server not ready after 300 s"
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _streamed(client: Client, adapter_id: str | None) -> str:
    events = client.generate_stream(PROMPT, adapter_id, max_new_tokens=MAX_NEW)
    return "".join(e.token.text for e in events if e.token is not None and not e.token.special)


def test_sdk_adapter_lifecycle_and_generation(server: str, adapter_dir: Path) -> None:
    with Client(server) as client:
        assert client.health() and client.ready()
        first = client.adapters.upload(adapter_dir, "alpha")
        again = client.adapters.upload(adapter_dir, "alpha")
        assert (first.status, again.status) == ("created", "unchanged")
        assert first.sha256 == again.sha256 and first.size_bytes and first.size_bytes > 0
        info = client.adapters.get("alpha")
        assert info.model_extra is not None
        assert info.model_extra["config"]["base_model"]["id"] == BASE
        assert "alpha" in [a.id for a in client.adapters.iter()]
        assert [m.id for m in client.models().data if m.parent is None] == [BASE]

        base = client.generate(PROMPT, max_new_tokens=MAX_NEW)
        adapted = client.generate(PROMPT, "alpha", max_new_tokens=MAX_NEW)
        assert base.details is not None and base.details.generated_tokens > 0
        assert adapted.details is not None and adapted.details.adapter_id == "alpha"
        # A non-zero adapter changes greedy output; streaming reassembles the same text.
        assert adapted.generated_text != base.generated_text
        assert _streamed(client, None) == base.generated_text
        assert _streamed(client, "alpha") == adapted.generated_text

        with pytest.raises(ValidationError) as info_422:
            client.generate(PROMPT, max_new_tokens=10_000)
        assert info_422.value.field == "parameters.max_new_tokens"

        (adapter_dir.parent / "changed").mkdir(exist_ok=True)
        changed = _make_adapter(adapter_dir.parent / "changed", seed=2)
        with pytest.raises(Conflict):
            client.adapters.upload(changed, "alpha")
        assert client.adapters.upload(changed, "alpha", overwrite=True).status == "replaced"

        client.adapters.delete("alpha")
        with pytest.raises(NotFound):
            client.generate(PROMPT, "alpha", max_new_tokens=2)


def test_openai_routes_through_sdk_and_async(server: str) -> None:
    with Client(server) as client:
        completion = client.complete(PROMPT, max_new_tokens=MAX_NEW, temperature=0)
        chunks = client.complete(PROMPT, max_new_tokens=MAX_NEW, temperature=0, stream=True)
        assert "".join(c.text for c in chunks) == completion.text
        chat = client.chat([{"role": "user", "content": "Say hi"}], max_new_tokens=8, temperature=0)
        assert chat.content and chat.choices[0].finish_reason in ("stop", "length")

    async def run() -> tuple[str, str]:
        async with AsyncClient(server) as client:
            result = await client.generate(PROMPT, max_new_tokens=MAX_NEW)
            stream = await client.generate_stream(PROMPT, max_new_tokens=MAX_NEW)
            text = "".join([e.token.text async for e in stream if e.token and not e.token.special])
            return result.generated_text, text

    whole, streamed = asyncio.run(run())
    assert whole == streamed


def test_cli_against_real_server(server: str, adapter_dir: Path) -> None:
    runner = CliRunner()
    with Client(server) as client:
        expected = client.generate(PROMPT, max_new_tokens=MAX_NEW).generated_text
    result = runner.invoke(app, ["--url", server, "generate", PROMPT, "-n", str(MAX_NEW)])
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"

    result = runner.invoke(
        app, ["--url", server, "adapters", "upload", str(adapter_dir), "--id", "cli-a"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("uploaded cli-a")
    result = runner.invoke(app, ["--url", server, "adapters", "delete", "cli-a"])
    assert result.stdout == "deleted cli-a\n"
    result = runner.invoke(app, ["--url", server, "adapters", "show", "cli-a"])
    assert result.exit_code == 1
    assert result.stderr == "error: 404 not_found_error: adapter 'cli-a' not found\n"
