"""A request that waits in an image or encoder engine's queue past FLORA_REQUEST_TIMEOUT is a
504 `timeout_error`, as on the generation routes (not a 500)."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from test_encoder_engine import TinyEncoderLoaded, make_bert
from vision_fixtures import make_loaded, png_bytes, random_image

from flora_server.engine.encoder import EncoderEngine
from flora_server.engine.protocol import DeadlineExceededError, RequestFailedError
from flora_server.engine.vision import VisionEngine
from flora_server.errors import engine_error_to_api
from flora_server.main import create_app
from flora_server.settings import Settings
from tests.unit.server.conftest import make_char_tokenizer

# Far below the engine's collection window (max_wait), so every request expires queued.
TIMEOUT = 1e-6


def _encoder(settings, registry, metrics):  # type: ignore[no-untyped-def]
    loaded = TinyEncoderLoaded(make_bert(), make_char_tokenizer())
    return EncoderEngine(loaded, registry, max_slots=2, max_wait=0.02), lambda path: None


def _vision(settings, registry, metrics):  # type: ignore[no-untyped-def]
    engine = VisionEngine(make_loaded(), registry, max_slots=2, max_wait=0.02, metrics=metrics)
    return engine, lambda path: None


def _client(tmp_path, factory) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    settings = Settings(home=tmp_path / "home", request_timeout=TIMEOUT)
    with TestClient(create_app(settings, engine_factory=factory)) as client:
        for _ in range(3000):  # up to 30 s on a loaded machine
            if client.get("/ready").status_code == 200:
                break
            time.sleep(0.01)
        else:
            raise AssertionError(client.get("/ready").text)
        yield client


@pytest.fixture
def encoder_client(tmp_path) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    yield from _client(tmp_path, _encoder)


@pytest.fixture
def vision_client(tmp_path) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    yield from _client(tmp_path, _vision)


def _assert_timeout(r) -> None:  # type: ignore[no-untyped-def]
    assert r.status_code == 504, r.text
    error = r.json()["error"]
    assert error["type"] == "timeout_error"
    assert "FLORA_REQUEST_TIMEOUT" in error["message"]


def test_encoder_queue_timeout_is_504(encoder_client: TestClient) -> None:
    _assert_timeout(encoder_client.post("/v1/embeddings", json={"input": ["abc"]}))


def test_vision_queue_timeout_is_504(vision_client: TestClient) -> None:
    image = base64.b64encode(png_bytes(random_image(1))).decode()
    _assert_timeout(vision_client.post("/v1/classify", json={"inputs": [image]}))


def test_deadline_maps_like_the_generation_routes() -> None:
    err = engine_error_to_api(DeadlineExceededError("timed out in the queue"))
    assert (err.status, err.type) == (504, "timeout_error")
    # Other failures inside the engine stay 500s.
    other = engine_error_to_api(RequestFailedError("the forward failed"))
    assert (other.status, other.type) == (500, "server_error")
