"""The real server: `python -m flora_server.cli` (uvicorn) on 127.0.0.1 with SmolLM2-135M.

Adapters are made here with `flora.inject` + random non-zero cores (normal, std 0.5, on
q_proj and v_proj) + `flora.adapter.save_adapter`, so they visibly change greedy output.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

BASE = "smollm2-135m-instruct"
PROMPT = "The capital of France is"
T = 120  # seconds per HTTP call: the test machines are shared and slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_adapters(out: Path) -> dict[str, Path]:
    import torch

    from flora import FloraConfig, adapter_layers, inject
    from flora import models as zoo
    from flora.adapter import save_adapter

    loaded = zoo.load(BASE)
    model = inject(loaded.model, FloraConfig(target_modules=["q_proj", "v_proj"], rank=4))
    dirs = {}
    for seed, name in ((1, "alpha"), (2, "beta"), (3, "pre")):
        torch.manual_seed(seed)
        with torch.no_grad():
            for _, layer in adapter_layers(model):
                layer.core.normal_(0.0, 0.5)
        dirs[name] = save_adapter(model, out / name, base_model_id=BASE)
    return dirs


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("srv")
    adapters = _make_adapters(work / "made")
    port = _free_port()
    env = {**os.environ, "FLORA_LOG_LEVEL": "warning"}
    cmd = [
        sys.executable, "-m", "flora_server.cli", "--model", BASE, "--port", str(port),
        "--adapter-store", str(work / "store"), "--max-upload-bytes", str(4 * 1024 * 1024),
        "--max-slots", "4", "--max-batch-size", "8", "--max-new-tokens", "64",
        "--adapter", f"pre={adapters['pre']}", "--preload",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-4000:]
            try:
                r = httpx.get(f"{url}/ready", timeout=2)
                if r.status_code == 200:
                    break
                assert "start-up failed" not in r.text, r.text
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server not ready after 300 s"
            time.sleep(0.5)
        yield {"url": url, "port": port, "adapters": adapters}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _generate(url: str, adapter: str | None, n: int = 12, prompt: str = PROMPT) -> str:
    r = httpx.post(
        f"{url}/generate",
        json={"inputs": prompt, "parameters": {"adapter_id": adapter, "max_new_tokens": n}},
        timeout=T,
    )
    assert r.status_code == 200, r.text
    return r.json()["generated_text"]


def _upload_dir(url: str, adapter_id: str, directory: Path) -> httpx.Response:
    files = {
        "config": ("adapter_config.json", (directory / "adapter_config.json").read_bytes()),
        "weights": ("adapter.safetensors", (directory / "adapter.safetensors").read_bytes()),
    }
    return httpx.post(f"{url}/v1/adapters", data={"adapter_id": adapter_id}, files=files, timeout=T)


def test_upload_generate_delete_404(server):
    url = server["url"]
    r = _upload_dir(url, "alpha", server["adapters"]["alpha"])
    assert r.status_code == 201, r.text
    assert r.json()["size_bytes"] > 0 and len(r.json()["sha256"]) == 64
    assert _upload_dir(url, "alpha", server["adapters"]["alpha"]).json()["status"] == "unchanged"
    base = _generate(url, None)
    alpha = _generate(url, "alpha")
    assert alpha != base
    info = httpx.get(f"{url}/v1/adapters/alpha", timeout=T).json()
    assert info["config"]["base_model"]["id"] == BASE and info["request_count"] == 1
    assert httpx.delete(f"{url}/v1/adapters/alpha", timeout=T).status_code == 200
    r = httpx.post(
        f"{url}/generate",
        json={"inputs": PROMPT, "parameters": {"adapter_id": "alpha"}},
        timeout=T,
    )
    assert r.status_code == 404 and r.json()["error_type"] == "not_found_error"  # TGI's shape


def test_archive_upload_with_digest_and_wrong_base_refused(server, tmp_path):
    from flora.adapter import load_adapter, save_adapter

    url = server["url"]
    archive = save_adapter(load_adapter(server["adapters"]["beta"]), tmp_path / "beta.flora")
    data = archive.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    r = httpx.post(
        f"{url}/v1/adapters",
        data={"adapter_id": "beta-archive", "sha256": digest},
        files={"archive": ("beta.flora", data)},
        timeout=T,
    )
    assert r.status_code == 201, r.text
    assert r.json()["sha256"] == digest  # the single-file form is stored byte for byte
    # Same tensors, but a config claiming another base: refused, nothing stored.
    cfg = json.loads((server["adapters"]["beta"] / "adapter_config.json").read_text())
    cfg["base_model"]["fingerprint"] = "sha256:" + "0" * 64
    files = {
        "config": ("c", json.dumps(cfg).encode()),
        "weights": ("w", (server["adapters"]["beta"] / "adapter.safetensors").read_bytes()),
    }
    r = httpx.post(f"{url}/v1/adapters", data={"adapter_id": "wrongbase"}, files=files, timeout=T)
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_adapter"
    assert httpx.get(f"{url}/v1/adapters/wrongbase", timeout=T).status_code == 404


def test_stream_equals_non_stream(server):
    url = server["url"]
    for adapter in (None, "pre"):
        body = {"inputs": PROMPT, "parameters": {"adapter_id": adapter, "max_new_tokens": 12}}
        full = httpx.post(f"{url}/generate", json=body, timeout=T).json()
        events = []
        with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=T) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
        assert events[-1]["generated_text"] == full["generated_text"]
        assert "".join(e["token"]["text"] for e in events) == full["generated_text"]
        assert events[-1]["details"]["generated_tokens"] == len(events)


def test_two_adapters_differ_and_are_batch_invariant(server):
    url = server["url"]
    for name in ("alpha", "beta"):
        r = _upload_dir(url, name, server["adapters"][name])
        assert r.status_code in (200, 201), r.text
    alone = {name: _generate(url, name) for name in ("alpha", "beta")}
    assert alone["alpha"] != alone["beta"]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        jobs = [(name, pool.submit(_generate, url, name)) for name in ("alpha", "beta") * 3]
        for name, job in jobs:
            assert job.result() == alone[name], name


def test_openai_client(server):
    import openai

    url = server["url"]
    _upload_dir(url, "alpha", server["adapters"]["alpha"])
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=T)
    models = {m.id: m.model_dump() for m in client.models.list()}
    assert BASE in models and models["alpha"]["parent"] == BASE
    assert models["pre"]["loaded"] is True  # --adapter + --preload put it on the device

    out = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=12, temperature=0)
    assert out.choices[0].text == _generate(url, "alpha")
    stream = client.completions.create(
        model="alpha", prompt=PROMPT, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == out.choices[0].text

    messages = [{"role": "user", "content": "Say hello."}]
    chat = client.chat.completions.create(
        model=BASE, messages=messages, max_tokens=10, temperature=0
    )
    text = chat.choices[0].message.content
    assert text and chat.usage.completion_tokens <= 10
    stream = client.chat.completions.create(
        model=BASE, messages=messages, max_tokens=10, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt="x", max_tokens=1)


def test_metrics_expose_adapter_metrics(server):
    url = server["url"]
    _generate(url, "pre", n=3)
    text = httpx.get(f"{url}/metrics", timeout=T).text
    assert 'flora_time_to_first_token_seconds_count{adapter="pre"}' in text
    assert 'flora_inter_token_latency_seconds_count{adapter="pre"}' in text
    assert "vllm:lora_requests_info{" in text and "flora_lora_requests_info{" in text
    assert 'max_lora="4"' in text
    assert "flora_engine_steps_total{" in text
    assert "flora_adapter_cache_misses_total" in text


def test_oversized_upload_refused_while_streaming(server):
    """413 arrives while the client is still sending a chunked body far over the cap."""
    total_planned = 64 * 1024 * 1024
    chunk = b"\x00" * (64 * 1024)
    sent = 0
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=30) as sock:
        head = (
            b"POST /v1/adapters HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=B\r\n\r\n"
        )
        part = b'--B\r\nContent-Disposition: form-data; name="archive"; filename="a"\r\n\r\n'
        sock.sendall(head + f"{len(part):x}\r\n".encode() + part + b"\r\n")
        try:
            while sent < total_planned:
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:
                    break
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = sock.recv(4096).decode("latin-1")
    assert response.startswith("HTTP/1.1 413"), response[:200]
    assert sent < total_planned / 2
