"""EncoderEngine behind the app: /v1/embeddings equals an independent masked-mean
reference (also through the `openai` client), adapters batch per row, text /v1/classify."""

from __future__ import annotations

import base64
import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from openai import OpenAI
from transformers import BertConfig, BertModel

import flora
from flora.adapter.io import adapter_from_model, encode_adapter
from flora.models.types import Pooling
from flora_server.engine.encoder import EncoderEngine
from flora_server.main import create_app
from flora_server.settings import Settings
from tests.unit.server.conftest import make_char_tokenizer


@dataclass
class TinyEncoderLoaded:
    model: Any
    preprocessor: Any
    name: str = "tiny-bert"
    kind: str = "text-encoder"
    fingerprint: str = "sha256:tiny"
    labels: Any = None
    context_length: int = 64
    source_path: Any = None
    pooling: Pooling = field(default_factory=Pooling)
    config: dict = field(default_factory=dict)


def make_bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=98,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return BertModel(config, add_pooling_layer=False).eval()


def make_text_adapter(with_head: bool) -> Any:
    torch.manual_seed(5)
    model = copy.deepcopy(make_bert())
    train = []
    if with_head:
        model.add_module("classifier", torch.nn.Linear(32, 2))
        train = ["classifier"]
    flora.inject(
        model, flora.FloraConfig(target_modules=["query", "value"], rank=4, train_modules=train)
    )
    with torch.no_grad():
        for _, layer in flora.adapter_layers(model):
            layer.core.normal_(0.0, 0.5)
    labels = ["neg", "pos"] if with_head else None
    return adapter_from_model(model, "tiny-bert", task="text-classification", labels=labels)


def reference(texts: list[str], adapter: Any | None = None) -> torch.Tensor:
    """Independent: padded forward, masked mean, L2 normalise."""
    model = make_bert()
    if adapter is not None and adapter.full_modules():
        model.add_module("classifier", torch.nn.Linear(32, 2))  # placeholder, as training does
    if adapter is not None:
        flora.apply_adapter(model, adapter, check_fingerprint=False)
    tok = make_char_tokenizer()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    e = (h * m).sum(1) / m.sum(1)
    return e / e.norm(dim=-1, keepdim=True)


def _factory(settings, registry, metrics):  # type: ignore[no-untyped-def]
    loaded = TinyEncoderLoaded(make_bert(), make_char_tokenizer())
    engine = EncoderEngine(loaded, registry, max_slots=2, max_wait=0.02)
    return engine, lambda path: flora.load_adapter(path)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    app = create_app(Settings(home=tmp_path_factory.mktemp("h")), engine_factory=_factory)
    with TestClient(app) as c:
        for _ in range(3000):  # up to 30 s on a loaded machine
            if c.get("/ready").status_code == 200:
                break
            time.sleep(0.01)
        for name, with_head in (("plain", False), ("sentiment", True)):
            archive, _ = encode_adapter(make_text_adapter(with_head), archive=True)
            r = c.post("/v1/adapters", data={"adapter_id": name}, files={"archive": ("a", archive)})
            assert r.status_code == 201, r.text
        yield c


TEXTS = ["a short one", "and a somewhat longer sentence here"]


def test_embeddings_equal_reference_float_and_base64(client: TestClient) -> None:
    ref = reference(TEXTS)
    r = client.post("/v1/embeddings", json={"input": TEXTS, "model": "tiny-bert"})
    assert r.status_code == 200, r.text
    body = r.json()
    got = torch.tensor([d["embedding"] for d in body["data"]])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert body["usage"]["prompt_tokens"] == sum(len(t) for t in TEXTS)  # one token per char
    b = client.post("/v1/embeddings", json={"input": TEXTS[0], "encoding_format": "base64"})
    vec = np.frombuffer(base64.b64decode(b.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, ref[0].numpy(), atol=1e-5)


def test_openai_client_and_adapter_rows(client: TestClient) -> None:
    api = OpenAI(base_url="http://testserver/v1", api_key="none", http_client=client)
    out = api.embeddings.create(model="plain", input=TEXTS)
    got = torch.tensor([d.embedding for d in out.data])
    adapter = make_text_adapter(False)
    torch.testing.assert_close(got, reference(TEXTS, adapter), atol=1e-5, rtol=0)
    assert (got - reference(TEXTS)).abs().max() > 1e-3  # the adapter changes the vectors


def test_text_classify_needs_a_head(client: TestClient) -> None:
    r = client.post("/v1/classify", json={"inputs": TEXTS, "adapter_id": "sentiment", "top_k": 2})
    assert r.status_code == 200, r.text
    adapter = make_text_adapter(True)
    emb = reference(TEXTS, adapter)
    head = adapter.full_state("classifier")
    probs = torch.softmax(emb @ head["weight"].T + head["bias"], -1)
    for row, p in zip(r.json()["results"], probs, strict=True):
        assert row[0]["label"] == ["neg", "pos"][int(p.argmax())]
        assert abs(row[0]["score"] - p.max().item()) < 1e-5
    for adapter_id in ("plain", None):
        bad = client.post("/v1/classify", json={"inputs": TEXTS, "adapter_id": adapter_id})
        assert bad.status_code == 422 and "no classification head" in bad.text
        # The field to change is the adapter (there is no "prompt" on this route).
        assert bad.json()["error"]["param"] == "adapter_id"
    wrong_route = client.post("/generate", json={"inputs": "x"})
    assert wrong_route.status_code == 404
    assert "is a text-encoder model (this route needs a causal-lm model)" in wrong_route.text


def test_encoder_adapter_whose_update_overflows_is_refused_at_upload(tmp_path) -> None:
    """One servability rule (ServingModel.check, through the engine) runs at upload: an
    encoder adapter whose finite core overflows once folded is a 422 there, not a 500 at
    its first request."""
    from flora.fingerprint import base_fingerprint
    from flora_server.adapters.validator import BaseSnapshot, BaseValidator

    def factory(settings, registry, metrics):  # type: ignore[no-untyped-def]
        bert = make_bert()
        loaded = TinyEncoderLoaded(bert, make_char_tokenizer(), fingerprint=base_fingerprint(bert))
        base = BaseSnapshot.of(loaded)
        engine = EncoderEngine(loaded, registry, max_slots=2, max_wait=0.02)
        return engine, BaseValidator(base, engine.check_adapter)

    huge = make_text_adapter(False)
    name = "encoder.layer.1.attention.self.value"
    huge.core(name).fill_(3e38)  # finite as stored; its fold overflows float32
    app = create_app(Settings(home=tmp_path / "h"), engine_factory=factory)
    with TestClient(app) as c:
        for _ in range(3000):
            if c.get("/ready").status_code == 200:
                break
            time.sleep(0.01)
        for adapter_id, adapter, status in (
            ("ok", make_text_adapter(False), 201),
            ("huge", huge, 422),
        ):
            archive, _ = encode_adapter(adapter, archive=True)
            r = c.post(
                "/v1/adapters", data={"adapter_id": adapter_id}, files={"archive": ("a", archive)}
            )
            assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_adapter"
        assert f"{name}: the update overflows float32" in error["message"]
        assert c.get("/v1/adapters/huge").status_code == 404  # nothing was stored
        assert c.post("/v1/embeddings", json={"model": "ok", "input": ["a"]}).status_code == 200
