"""/v1/classify on a tiny image classifier: upload, classify (JSON and multipart), bad
images, kind-specific routes."""

from __future__ import annotations

import base64
import io
import json
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


# --- multipart fields, media types, base64 line breaks, messages ------------------------


def _png() -> bytes:
    return png_bytes(random_image(6))


@pytest.mark.parametrize(
    ("data", "extra_files", "param", "message"),
    [
        # A misspelt field used to be ignored: the base answered as if no adapter was asked.
        ({"adapter": "nope"}, [], "adapter", "adapter: unexpected form field"),
        (
            {},
            [("adapter_id", ("id.txt", b"digits", "text/plain"))],
            "adapter_id",
            "adapter_id: send a text value, not a file",
        ),
        (
            {"adapter_id": ["nope", "tiny-cnn"]},
            [],
            "adapter_id",
            "adapter_id: given more than once",
        ),
        ({"top_k": ["1", "2"]}, [], "top_k", "top_k: given more than once"),
        (
            {"files": "not a file"},
            [],
            "files",
            "files: send a file (a part with a filename), not a text value",
        ),
    ],
)
def test_multipart_unknown_repeated_or_misplaced_fields_are_422(
    client: TestClient, data: dict, extra_files: list, param: str, message: str
) -> None:
    files = [("files", ("a.png", _png(), "image/png")), *extra_files]
    r = client.post("/v1/classify", data=data, files=files)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == param
    assert r.json()["error"]["message"] == message


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "top_k: Input should be greater than or equal to 1"),
        ("1001", "top_k: Input should be less than or equal to 1000"),
        ("abc", "top_k: Input should be a valid integer, unable to parse string as an integer"),
    ],
)
def test_multipart_top_k_errors_read_like_json_ones(
    client: TestClient, value: str, message: str
) -> None:
    files = [("files", ("a.png", _png(), "image/png"))]
    m = client.post("/v1/classify", data={"top_k": value}, files=files)
    j = client.post("/v1/classify", json={"inputs": [_b64(_png())], "top_k": value})
    assert m.status_code == j.status_code == 422
    assert (
        m.json()["error"]
        == j.json()["error"]
        == {"type": "invalid_request_error", "message": message, "param": "top_k"}
    )


def _multipart_body(boundary: str, name: str, data: bytes, fields: dict[str, str]) -> bytes:
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
        for key, value in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="f"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
    )
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def test_media_types_are_case_insensitive(client: TestClient) -> None:
    png = _png()
    want = client.post("/v1/classify", json={"inputs": [_b64(png)], "top_k": 2})
    assert want.status_code == 200, want.text
    for content_type in ("Application/JSON", "APPLICATION/json; Charset=UTF-8"):
        body = json.dumps({"inputs": [_b64(png)], "top_k": 2})
        r = client.post("/v1/classify", content=body, headers={"content-type": content_type})
        assert r.status_code == 200, (content_type, r.text)
        assert r.json() == want.json()
    multipart = _multipart_body("xx", "files", png, {"top_k": "2"})
    for content_type in ("Multipart/Form-Data; boundary=xx", "MULTIPART/FORM-DATA; Boundary=xx"):
        r = client.post("/v1/classify", content=multipart, headers={"content-type": content_type})
        assert r.status_code == 200, (content_type, r.text)
        assert r.json() == want.json()
    # Only these two: a type that merely starts like one is not it.
    for content_type in ("application/jsonl", "text/plain", "multipart/mixed; boundary=xx"):
        r = client.post("/v1/classify", content=multipart, headers={"content-type": content_type})
        assert r.status_code == 415, (content_type, r.text)
    # /v1/adapters reads its media type through the same function.
    archive, _ = encode_adapter(make_conv_adapter(2, 3), archive=True)
    upload = _multipart_body("yy", "archive", archive, {"adapter_id": "case"})
    r = client.post(
        "/v1/adapters", content=upload, headers={"content-type": "Multipart/Form-Data; boundary=yy"}
    )
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_base64_wrapped_in_lines_is_accepted(client: TestClient, newline: str) -> None:
    # coreutils `base64` wraps at 76 columns, `openssl base64` at 64 (RFC 2045 line breaks).
    png = png_bytes(random_image(7, (40, 30)))
    flat = _b64(png)
    want = client.post("/v1/classify", json={"inputs": [flat], "top_k": 3})
    assert want.status_code == 200, want.text
    for width in (76, 64):
        wrapped = newline.join(flat[i : i + width] for i in range(0, len(flat), width)) + newline
        for text in (wrapped, "data:image/png;base64," + wrapped):
            r = client.post("/v1/classify", json={"inputs": [text], "top_k": 3})
            assert r.status_code == 200, r.text
            assert r.json() == want.json()
    # A space inside a line is no encoder's output: still named as text, not decoded.
    spaced = flat[:40] + " " + flat[40:]
    r = client.post("/v1/classify", json={"inputs": [spaced]})
    assert r.status_code == 422
    assert r.json()["error"]["message"].startswith("inputs[0]: text; this server classifies")


# --- very tall or wide images at the real crop size ---------------------------------------


def _gray_png(width: int, height: int) -> bytes:
    """A grey PNG written directly (Pillow's encoder is slow for 16M-pixel strips)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        return struct.pack(">I", len(body)) + kind + body + crc

    raw = (b"\x00" + b"\x80" * width) * height
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def client_224(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The Lite0 preprocessing (224 crop of 256) and the default 16,777,216-pixel limit."""

    def factory(settings, registry, metrics):  # type: ignore[no-untyped-def]
        engine = VisionEngine(make_loaded(size=224), registry, max_wait=0.02, metrics=metrics)
        return engine, lambda path: None

    settings = Settings(home=tmp_path_factory.mktemp("home224"))
    assert settings.max_image_pixels == 1 << 24
    with TestClient(create_app(settings, engine_factory=factory)) as c:
        for _ in range(3000):
            if c.get("/ready").status_code == 200:
                break
            time.sleep(0.01)
        yield c


def test_strips_at_the_pixel_limit_are_classified(client_224: TestClient) -> None:
    # Both were 500s (OverflowError) or worse: the whole image was resized before the crop,
    # 1 x 16,777,216 (32 KB as PNG) to 256 x 4G, 16 x 1,048,576 to 256 x 16M (17 GB).
    tall = _gray_png(1, 1 << 24)  # multipart: the audit's request (its decode takes ~1 s)
    wide = _gray_png(16, 1 << 20)  # JSON (a 1M-row PNG decodes in ~0.1 s)
    grey = Image.new("RGB", (1, 1), (128, 128, 128))
    ref = torch.softmax(reference_logits(None, grey, ImageTransform(size=224)), -1)
    for r in (
        client_224.post("/v1/classify", files=[("files", ("tall.png", tall, "image/png"))]),
        client_224.post("/v1/classify", json={"inputs": [_b64(wide)]}),
    ):
        assert r.status_code == 200, r.text
        top = r.json()["results"][0]
        # Uniform grey: the answer of any grey image (the crop is all grey).
        assert [x["index"] for x in top] == ref.argsort(descending=True)[:5].tolist()
        assert max(abs(x["score"] - ref[x["index"]].item()) for x in top) < 1e-5
