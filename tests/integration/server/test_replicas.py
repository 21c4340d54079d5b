"""Two real `flora-serve` processes sharing one adapter store (a directory, then S3 on moto).

The base is a tiny random Llama written here (2 layers, hidden 32) with SmolLM2's tokenizer,
served with `--model DIR`, so the servers start in seconds. What is checked, per backend:

- upload through A, generate through B: B loads it from the store on first use, no restart,
  and gives A's greedy tokens;
- overwrite through A (B has the old version on a device slot): B serves the new weights
  within FLORA_STORE_RECHECK_SECONDS (+ slack for this slow machine) and never goes back;
- delete through A: B answers 404 within the same bound.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

RECHECK = 1.0
# A generate round trip plus one engine step plus a reload, on 2 shared cores.
SLACK = 4.0
PROMPT = "The capital of France is"
T = 60
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, {name: adapter dir}) for a tiny random Llama with SmolLM2's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from flora import FloraConfig, adapter_layers, inject
    from flora.adapter import save_adapter
    from flora.models.storage import home

    tokenizer_dir = home() / "models" / "smollm2-135m-instruct"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        pytest.skip("SmolLM2 is not converted under FLORA_HOME (run `python -m flora.models`)")
    work = tmp_path_factory.mktemp("replicas")
    model_dir = work / "tiny-llama"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, model_dir / name)
    model = inject(model, FloraConfig(target_modules=TARGETS, rank=4))
    adapters = {}
    for seed, name in ((1, "v1"), (2, "v2")):
        torch.manual_seed(seed)
        with torch.no_grad():
            for _, layer in adapter_layers(model):
                layer.core.normal_(0.0, 2.0)
        adapters[name] = save_adapter(model, work / name, base_model_id="tiny-llama")
    return model_dir, adapters


def _start(model_dir: Path, home: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [
        sys.executable, "-m", "flora_server.cli", "--model", str(model_dir),
        "--port", str(port), "--home", str(home), "--max-new-tokens", "16",
        "--default-max-new-tokens", "8",
        "--max-slots", "2", "--store-recheck-seconds", str(RECHECK),
    ]  # fmt: skip
    full_env = {**os.environ, "FLORA_LOG_LEVEL": "warning", **env}
    proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def _wait_ready(proc: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, proc.stdout.read().decode()[-4000:]
        with contextlib.suppress(httpx.TransportError):
            r = httpx.get(f"{url}/ready", timeout=2)
            if r.status_code == 200:
                return
            assert "start-up failed" not in r.text, r.text
        assert time.monotonic() < deadline, "server not ready after 180 s"
        time.sleep(0.3)


@contextlib.contextmanager
def _replicas(model_dir: Path, work: Path, env: dict[str, str]):
    procs = [_start(model_dir, work / f"home-{name}", env) for name in ("a", "b")]
    try:
        for proc, url in procs:
            _wait_ready(proc, url)
        yield [url for _, url in procs]
    finally:
        for proc, _ in procs:
            proc.terminate()
        for proc, _ in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _generate(url: str, adapter: str | None) -> httpx.Response:
    body = {"inputs": PROMPT, "parameters": {"adapter_id": adapter, "max_new_tokens": 8}}
    return httpx.post(f"{url}/generate", json=body, timeout=T)


def _tokens(url: str, adapter: str | None) -> str:
    r = _generate(url, adapter)
    assert r.status_code == 200, r.text
    return r.json()["generated_text"]


def _upload(url: str, directory: Path, *, overwrite: bool = False) -> httpx.Response:
    files = {
        "config": ("adapter_config.json", (directory / "adapter_config.json").read_bytes()),
        "weights": ("adapter.safetensors", (directory / "adapter.safetensors").read_bytes()),
    }
    return httpx.post(
        f"{url}/v1/adapters",
        params={"overwrite": str(overwrite).lower()},
        data={"adapter_id": "shared"},
        files=files,
        timeout=T,
    )


def _exercise(a: str, b: str, adapters: dict[str, Path]) -> None:
    base = _tokens(a, None)
    assert _tokens(b, None) == base  # the same base on both
    assert _generate(b, "shared").status_code == 404

    # Upload through A; B has never seen it and loads it from the store on first use.
    assert _upload(a, adapters["v1"]).status_code == 201
    v1 = _tokens(a, "shared")
    assert v1 != base  # the adapter visibly changes the greedy output
    assert _tokens(b, "shared") == v1
    listed = httpx.get(f"{b}/v1/adapters", timeout=T).json()
    assert [d["id"] for d in listed["data"]] == ["shared"]

    # Overwrite through A while B holds v1 on a device slot.
    r = _upload(a, adapters["v2"], overwrite=True)
    assert r.status_code == 200 and r.json()["status"] == "replaced"
    changed_at = time.monotonic()
    v2 = _tokens(a, "shared")
    assert v2 not in (v1, base)  # else this test could not tell the versions apart
    outputs = []
    while True:
        out = _tokens(b, "shared")
        outputs.append(out)
        if out == v2:
            break
        assert out == v1, outputs  # old or new weights, never anything else
        assert time.monotonic() - changed_at < RECHECK + SLACK, "B kept serving v1"
        time.sleep(0.1)
    for _ in range(3):  # and it never goes back
        assert _tokens(b, "shared") == v2

    # Delete through A: B refuses within the bound.
    assert httpx.delete(f"{a}/v1/adapters/shared", timeout=T).status_code == 200
    deleted_at = time.monotonic()
    while (r := _generate(b, "shared")).status_code != 404:
        assert r.status_code == 200 and r.json()["generated_text"] == v2, r.text
        assert time.monotonic() - deleted_at < RECHECK + SLACK, "B kept serving a deleted adapter"
        time.sleep(0.1)
    assert r.json()["error_type"] == "not_found_error"  # TGI's flat shape on /generate
    assert httpx.get(f"{b}/v1/adapters/shared", timeout=T).status_code == 404


def test_two_replicas_share_a_directory(tiny, tmp_path):
    model_dir, adapters = tiny
    env = {"FLORA_ADAPTER_STORE": str(tmp_path / "shared-store")}
    with _replicas(model_dir, tmp_path, env) as (a, b):
        _exercise(a, b, adapters)


def test_two_replicas_share_s3(tiny, tmp_path):
    from moto.server import ThreadedMotoServer

    from flora_server.adapters.s3_store import make_s3_client

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        aws = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        with pytest.MonkeyPatch.context() as mp:
            for key, value in aws.items():
                mp.setenv(key, value)
            make_s3_client(endpoint).create_bucket(Bucket="flora-replicas")
        env = {
            **aws,
            "FLORA_ADAPTER_STORE": f"s3://flora-replicas/{uuid.uuid4().hex[:8]}/adapters",
            "FLORA_S3_ENDPOINT_URL": endpoint,
        }
        model_dir, adapters = tiny
        with _replicas(model_dir, tmp_path, env) as (a, b):
            _exercise(a, b, adapters)
    finally:
        server.stop()
