"""/v1/classify on a tiny image classifier: upload, classify (JSON and multipart), bad
images, kind-specific routes."""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from vision_fixtures import (
    make_conv_adapter,
    make_loaded,
    png_bytes,
    random_image,
    reference_logits,
)

from flora.adapter import load_adapter, validate_against
from flora.adapter.io import encode_adapter
from flora.fingerprint import describe_base
from flora.models.image_transform import ImageTransform
from flora_server.adapters.registry import AdapterValidationError
from flora_server.engine.vision import VisionEngine
from flora_server.main import create_app
from flora_server.settings import Settings


def _factory(settings, registry, metrics):  # type: ignore[no-untyped-def]
    loaded = make_loaded()
    specs = describe_base(loaded.model)

    def validator(path: Path) -> object:
        from flora.errors import AdapterError

        try:
            adapter = load_adapter(path)
            validate_against(adapter, specs, None)
        except AdapterError as exc:
            raise AdapterValidationError(str(exc)) from exc
        return adapter

    engine = VisionEngine(loaded, registry, max_slots=3, max_wait=0.02, metrics=metrics)
    return engine, validator


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    home = tmp_path_factory.mktemp("home")
    settings = Settings(home=home, max_inputs_per_request=3, max_image_pixels=64 * 64)
    app = create_app(settings, engine_factory=_factory)
    with TestClient(app) as c:
        for _ in range(3000):  # up to 30 s on a loaded machine
            if c.get("/ready").status_code == 200:
                break
            time.sleep(0.01)
        yield c


@pytest.fixture(scope="module")
def uploaded(client: TestClient) -> object:
    torch.manual_seed(0)
    adapter = make_conv_adapter(1, 3)
    archive, _ = encode_adapter(adapter, archive=True)
    r = client.post(
        "/v1/adapters", data={"adapter_id": "digits"}, files={"archive": ("a.flora", archive)}
    )
    assert r.status_code == 201, r.text
    return adapter


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_classify_json_and_multipart_match_offline(client: TestClient, uploaded: object) -> None:
    image = random_image(3)
    data = png_bytes(image)
    ref = torch.softmax(
        reference_logits(uploaded, Image.open(io.BytesIO(data)), ImageTransform(size=16)), -1
    )
    r = client.post(
        "/v1/classify", json={"inputs": [_b64(data)], "adapter_id": "digits", "top_k": 3}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny-cnn" and body["adapter_id"] == "digits"
    top = body["results"][0]
    assert [x["index"] for x in top] == ref.argsort(descending=True).tolist()
    for x in top:
        assert abs(x["score"] - ref[x["index"]].item()) < 1e-5
        assert x["label"] == f"a1-{x['index']}"
    m = client.post(
        "/v1/classify",
        data={"adapter_id": "digits", "top_k": "3"},
        files=[("files", ("x.png", data, "image/png")), ("files", ("y.png", data, "image/png"))],
    )
    assert m.status_code == 200, m.text
    for row in m.json()["results"]:
        assert [x["index"] for x in row] == [x["index"] for x in top]
        assert max(abs(x["score"] - y["score"]) for x, y in zip(row, top, strict=True)) < 1e-6


def test_base_uses_imagenet_style_labels(client: TestClient) -> None:
    data = png_bytes(random_image(5), "JPEG")
    r = client.post("/v1/classify", json={"inputs": [_b64(data)], "top_k": 1})
    assert r.status_code == 200, r.text
    ref = torch.softmax(
        reference_logits(None, Image.open(io.BytesIO(data)), ImageTransform(size=16)), -1
    )
    assert r.json()["results"][0][0]["label"] == f"base{int(ref.argmax())}"


def _png_header_only(width: int, height: int) -> bytes:
    """A real 8x8 PNG whose IHDR is rewritten to declare width x height (a decompression
    bomb's header: the pixel data is never decoded)."""
    data = bytearray(png_bytes(random_image(2, (8, 8))))
    data[16:24] = struct.pack(">II", width, height)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR CRC
    return bytes(data)


def _fmt(fmt: str) -> bytes:
    return png_bytes(random_image(1), fmt)


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        (b"\x00not an image at all", 422),
        (png_bytes(random_image(1))[:60], 422),  # truncated PNG
        (_png_header_only(50_000, 50_000), 413),  # refused from the header
        (_png_header_only(65, 64), 413),  # just over the configured limit
        (_fmt("GIF"), 415),
        (_fmt("BMP"), 415),
        (_fmt("TIFF"), 415),
    ],
)
def test_bad_images_get_4xx(client: TestClient, payload: bytes, status: int) -> None:
    r = client.post("/v1/classify", json={"inputs": [_b64(payload)]})
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"].startswith("image 0")
    m = client.post("/v1/classify", files=[("files", ("f", payload, "application/octet-stream"))])
    assert m.status_code == status, m.text


def test_text_sent_to_the_image_server_is_named_as_text(client: TestClient) -> None:
    r = client.post("/v1/classify", json={"inputs": ["a photo of a cat"]})
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["param"] == "inputs"
    assert error["message"].startswith("inputs[0]: text; this server classifies images")
    wrong_route = client.post("/v1/embeddings", json={"input": "x", "model": "m"})
    assert wrong_route.status_code == 404
    assert "is an image-classifier model" in wrong_route.json()["error"]["message"]


def test_request_limits_and_bad_fields(client: TestClient) -> None:
    data = _b64(png_bytes(random_image(1)))
    too_many = client.post("/v1/classify", json={"inputs": [data] * 4})
    assert too_many.status_code == 422 and "at most 3" in too_many.json()["error"]["message"]
    assert client.post("/v1/classify", json={"inputs": ["%%%"]}).status_code == 422
    assert client.post("/v1/classify", json={"inputs": [data], "top_k": 0}).status_code == 422
    missing = client.post("/v1/classify", json={"inputs": [data], "adapter_id": "nope"})
    assert missing.status_code == 404


def test_routes_of_other_kinds_answer_404_naming_the_kind(client: TestClient) -> None:
    for path, body in [
        ("/generate", {"inputs": "hi"}),
        ("/v1/completions", {"model": "x", "prompt": "hi"}),
        ("/v1/embeddings", {"input": "hi"}),
    ]:
        r = client.post(path, json=body)
        assert r.status_code == 404, (path, r.text)
        error = r.json()["error"]  # a string in TGI's flat shape (/generate)
        assert "image-classifier" in (error if isinstance(error, str) else error["message"])
    models = client.get("/v1/models")
    assert models.status_code == 200 and models.json()["data"][0]["id"] == "tiny-cnn"
