"""Adapter configs that used to break a real `flora-serve` process.

- A PEFT config with a badly typed field (`"lora_alpha": null`, `"alpha_pattern": ["q_proj"]`,
  `{"(": 4}`, ...) was a 500 (a TypeError or re.error in the conversion): it is a 422
  `invalid_adapter` naming the field, and nothing is stored. An aLoRA config
  (`alora_invocation_tokens`) was converted to an always-on LoRA: it is the same 422.
- A PEFT `alpha_pattern` key such as `(.*.*)*z` ran on Python's backtracking `re` inside the
  upload's worker thread and, holding the GIL, froze every route (even /health) for minutes:
  it is now matched in linear time, and the server keeps answering.
- An adapter whose config names `train_modules` was a 500 once any adapter had been served
  (the base's fingerprint was taken from the live, wrapped model): it is the same 422 as on a
  fresh server.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from tiny import api_error, make_adapter_dirs, make_model_dir, running_server, upload_files

from flora import models as zoo
from flora.adapter import load_adapter
from flora.adapter.io import fingerprint_without_trained
from flora.interop import to_peft

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    work = tmp_path_factory.mktemp("cfg")
    model_dir = make_model_dir(work / "model")
    flora_dirs = make_adapter_dirs(model_dir, work / "adapters", [21, 22])
    peft_dir = to_peft(load_adapter(flora_dirs[0]), work / "peft")
    with running_server(model_dir, work / "store") as server:
        yield server, model_dir, flora_dirs, peft_dir


def _peft_files(peft_dir: Path, **patch: object) -> dict[str, tuple[str, bytes]]:
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    weights = (peft_dir / "adapter_model.safetensors").read_bytes()
    return {
        "config": ("adapter_config.json", json.dumps({**config, **patch}).encode()),
        "weights": ("adapter_model.safetensors", weights),
    }


def _upload(url: str, adapter_id: str, files: dict, timeout: float = 60) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/adapters", data={"adapter_id": adapter_id}, files=files, timeout=timeout
    )


def _generate(url: str, adapter_id: str | None) -> str:
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 6, "adapter_id": adapter_id}}
    r = httpx.post(f"{url}/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["generated_text"]


@pytest.mark.parametrize(
    ("patch", "named"),
    [
        ({"lora_alpha": None}, "lora_alpha"),
        ({"lora_alpha": [1]}, "lora_alpha"),
        ({"alpha_pattern": ["q_proj"]}, "alpha_pattern"),
        ({"alpha_pattern": {"q_proj": None}}, "alpha_pattern['q_proj']"),
        ({"alpha_pattern": {"(": 4}}, "alpha_pattern key '('"),
        ({"rank_pattern": {"q_proj": "2"}}, "rank_pattern['q_proj']"),
        ({"target_modules": {"q_proj": 1}}, "target_modules"),
        # aLoRA applies from its invocation tokens on: as plain LoRA it would be wrong maths
        ({"alora_invocation_tokens": [1, 2]}, "alora_invocation_tokens=[1, 2]"),
    ],
)
def test_badly_typed_peft_config_is_422_naming_the_field(served, patch, named) -> None:
    server, _, _, peft_dir = served
    r = _upload(server.url, "bad-peft", _peft_files(peft_dir, **patch))
    assert r.status_code == 422, r.text
    error = api_error(r)
    assert error["type"] == "invalid_adapter" and named in error["message"], error
    assert httpx.get(f"{server.url}/v1/adapters/bad-peft", timeout=10).status_code == 404


def test_backtracking_pattern_key_keeps_the_server_answering(served) -> None:
    server, _, _, peft_dir = served
    slowest = [0.0]
    stop = threading.Event()

    def probe() -> None:  # /health all along the upload
        while not stop.is_set():
            start = time.monotonic()
            with contextlib.suppress(httpx.TimeoutException):
                httpx.get(f"{server.url}/health", timeout=10)
            slowest[0] = max(slowest[0], time.monotonic() - start)
            time.sleep(0.05)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    start = time.monotonic()
    try:
        # the q/v/o/... names of the tiny Llama are 30+ characters: minutes on Python's re
        files = _peft_files(peft_dir, alpha_pattern={"(.*.*)*z": 4.0})
        r = _upload(server.url, "evil-key", files, timeout=30)
    finally:
        stop.set()
        prober.join(15)
    assert r.status_code == 201, r.text
    assert time.monotonic() - start < 10
    assert slowest[0] < 5
    # served, and as the same adapter without the key (which matches no module)
    r = _upload(server.url, "no-key", _peft_files(peft_dir))
    assert r.status_code == 201, r.text
    assert _generate(server.url, "evil-key") == _generate(server.url, "no-key")


def test_train_modules_adapter_is_422_after_an_adapter_was_served(served) -> None:
    server, model_dir, flora_dirs, _ = served
    # what a fresh server compares the adapter with: the base less lm_head
    want = fingerprint_without_trained(zoo.load(str(model_dir)).model, ["lm_head"])
    r = _upload(server.url, "served", upload_files(flora_dirs[0]))
    assert r.status_code in (200, 201), r.text
    _generate(server.url, "served")  # its modules are wrapped from here on
    directory = flora_dirs[1]
    config = json.loads((directory / "adapter_config.json").read_text())
    config["config"]["train_modules"] = ["lm_head"]  # no full.lm_head.*: trained for another
    files = upload_files(directory)
    files["config"] = ("adapter_config.json", json.dumps(config).encode())
    # the first verdict on ["lm_head"] is taken now, after serving (it is then cached)
    r = _upload(server.url, "head", files)
    assert r.status_code == 422, r.text
    error = api_error(r)
    assert error["type"] == "invalid_adapter" and f"this base is {want}" in error["message"]
    assert httpx.get(f"{server.url}/v1/adapters/head", timeout=10).status_code == 404
