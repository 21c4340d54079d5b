"""A real `flora-serve --model efficientnet-lite0` with adapters trained by the real
`flora-train image-classification` on builtin:mnist5k (2 steps at 32 px: the cores and the
new 10-class head are non-zero and differ per seed).

Checks: an uploaded adapter classifies an MNIST digit (PNG bytes) with the same labels and
scores (1e-5) as offline flora (`flora.apply_adapter` on a fresh `flora.models.load` base +
the adapter's saved `ImageTransform`); concurrent requests for 3 adapters and the base (one
mixed batch) equal each request run alone; every bad image gets its 4xx.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image
from serve_process import T, running_server

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

BASE = "efficientnet-lite0"
MAX_INPUTS = 4
MAX_PIXELS = 512 * 512
SEEDS = (1, 2, 3)


def _train(out: Path, seed: int) -> subprocess.Popen[bytes]:
    cmd = [
        str(Path(sys.executable).parent / "flora-train"), "image-classification",
        "--base", BASE, "--data", "builtin:mnist5k", "--max-steps", "2", "--batch-size", "8",
        "--image-size", "32", "--eval-limit", "8", "--lr", "0.005", "--seed", str(seed),
        "--threads", "1", "--quiet", "--out", str(out),
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Any:
    work = tmp_path_factory.mktemp("vision")
    dirs = {f"digits{s}": work / f"digits{s}" for s in SEEDS}
    # The three trainings run while the server starts.
    procs = {name: _train(out, seed) for (name, out), seed in zip(dirs.items(), SEEDS, strict=True)}
    args = [
        "--model", BASE, "--adapter-store", str(work / "store"), "--max-slots", "4",
        "--max-batch-size", "16", "--batch-wait-ms", "100",
        "--max-inputs-per-request", str(MAX_INPUTS), "--max-image-pixels", str(MAX_PIXELS),
    ]  # fmt: skip
    with running_server(args) as url:
        for name, proc in procs.items():
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, f"{name}: {out.decode()[-3000:]}"
        yield {"url": url, "dirs": dirs}


def _upload(url: str, adapter_id: str, directory: Path) -> httpx.Response:
    files = {
        "config": ("adapter_config.json", (directory / "adapter_config.json").read_bytes()),
        "weights": ("adapter.safetensors", (directory / "adapter.safetensors").read_bytes()),
    }
    return httpx.post(f"{url}/v1/adapters", data={"adapter_id": adapter_id}, files=files, timeout=T)


@pytest.fixture(scope="module")
def uploaded(setup: Any) -> Any:
    for name, directory in setup["dirs"].items():
        r = _upload(setup["url"], name, directory)
        assert r.status_code == 201, r.text
    return setup


def _digits(indices: list[int]) -> list[bytes]:
    """mnist5k digits (grayscale 28x28, as flora-train reads them) as PNG bytes."""
    from flora.train.builtin import mnist5k_arrays

    pixels, _ = mnist5k_arrays()
    out = []
    for i in indices:
        buf = io.BytesIO()
        Image.fromarray(pixels[i], mode="L").save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _classify(url: str, adapter: str | None, images: list[bytes], top_k: int = 10) -> Any:
    data: dict[str, str] = {"top_k": str(top_k)}
    if adapter is not None:
        data["adapter_id"] = adapter
    files = [("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(images)]
    return httpx.post(f"{url}/v1/classify", data=data, files=files, timeout=T)


def _offline(directory: Path, image: bytes, body: bool = True) -> list[tuple[str, float]]:
    """flora.apply_adapter on a fresh base, the adapter's saved ImageTransform: (label,
    softmax score) for all classes, best first. `body=False` zeroes the FLoRA cores (the
    new head alone), to show the conv adapters matter."""
    import flora
    from flora.models import load
    from flora.models.image_transform import ImageTransform

    adapter = flora.load_adapter(directory)
    if not body:
        for key, tensor in adapter.tensors.items():
            if key.endswith(".core"):
                tensor.zero_()
    model = load(BASE).model.eval()
    flora.apply_adapter(model, adapter)  # fingerprint checked against the fresh base
    transform = ImageTransform.from_dict(adapter.metadata["image_transform"])
    assert transform.size == 32
    x = transform(Image.open(io.BytesIO(image)).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        probs = torch.softmax(model(x)[0].float(), dim=-1)
    order = probs.argsort(descending=True).tolist()
    return [(adapter.labels[i], float(probs[i])) for i in order]


def _pairs(result: list[dict[str, Any]]) -> list[tuple[str, float]]:
    return [(p["label"], p["score"]) for p in result]


def _assert_close(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> None:
    assert [g[1] for g in got] == pytest.approx([w[1] for w in want], abs=1e-5)
    # Labels agree wherever the scores are told apart (near-ties may swap places).
    for (gl, gs), (wl, ws) in zip(got, want, strict=True):
        assert gl == wl or abs(gs - ws) < 1e-5


def test_uploaded_adapter_matches_offline_flora(uploaded: Any) -> None:
    url, directory = uploaded["url"], uploaded["dirs"]["digits1"]
    image = _digits([7])[0]
    r = _classify(url, "digits1", [image])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == BASE and body["adapter_id"] == "digits1"
    got = _pairs(body["results"][0])
    assert len(got) == 10 and {lab for lab, _ in got} == {str(d) for d in range(10)}
    _assert_close(got, _offline(directory, image))
    head_only = dict(_offline(directory, image, body=False))
    assert max(abs(s - head_only[lab]) for lab, s in got) > 1e-3  # the conv adapters count
    # The base answers with ImageNet labels and differs from the adapter.
    base = _classify(url, None, [image], top_k=3).json()["results"][0]
    assert len(base) == 3 and all(p["label"] not in {str(d) for d in range(10)} for p in base)


def test_mixed_batch_equals_each_request_alone(uploaded: Any) -> None:
    url = uploaded["url"]
    images = _digits([0, 501, 1002, 1503, 2004])
    requests = [
        ("digits1", images[0:2]),
        ("digits2", images[1:3]),
        (None, images[2:3]),
        ("digits3", images[3:5]),
        ("digits1", images[4:5]),
    ]
    alone = []
    for adapter, imgs in requests:
        r = _classify(url, adapter, imgs)
        assert r.status_code == 200, r.text
        alone.append(r.json()["results"])
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(_classify, url, a, imgs) for a, imgs in requests]
        mixed = [f.result() for f in futures]
    for r, solo in zip(mixed, alone, strict=True):
        assert r.status_code == 200, r.text
        for got, want in zip(r.json()["results"], solo, strict=True):
            _assert_close(_pairs(got), _pairs(want))
    # The three adapters really differ on the same digit (image 1 for digits1 and digits2).
    one, two = dict(_pairs(alone[0][1])), dict(_pairs(alone[1][0]))
    assert max(abs(one[lab] - two[lab]) for lab in one) > 1e-3


def _png_header(width: int, height: int) -> bytes:
    """A PNG declaring width x height whose pixel data is one tiny (bogus) IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("case", "status", "fragment"),
    [
        ("corrupt", 422, "corrupt"),
        ("garbage", 422, "not a JPEG, PNG or WebP"),
        ("gif", 415, "GIF"),
        ("bmp", 415, "BMP"),
        ("bomb", 413, "too many pixels"),  # Pillow's own net, at the header
        ("big", 413, f"2000x2000 = 4000000 pixels, the limit is {MAX_PIXELS}"),
        ("too_many", 422, f"at most {MAX_INPUTS}"),
    ],
)
def test_bad_images_get_their_4xx(setup: Any, case: str, status: int, fragment: str) -> None:
    good = _digits([3])[0]
    images = {
        "corrupt": [good, good[:40] + b"\x00" * 60],  # valid header, truncated pixel data
        "garbage": [b"definitely not an image"],
        "gif": [_encoded("GIF")],
        "bmp": [_encoded("BMP")],
        "bomb": [_png_header(50_000, 50_000)],
        "big": [_png_header(2000, 2000)],  # only the header is read: its IDAT is bogus
        "too_many": [good] * (MAX_INPUTS + 1),
    }[case]
    r = _classify(setup["url"], None, images)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"]
    # The same through JSON base64 inputs.
    inputs = [base64.b64encode(b).decode() for b in images]
    r = httpx.post(f"{setup['url']}/v1/classify", json={"inputs": inputs}, timeout=T)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"]


def test_head_that_does_not_fit_the_base_is_refused_at_upload(setup: Any) -> None:
    import flora
    from flora.adapter.io import encode_adapter

    adapter = flora.load_adapter(setup["dirs"]["digits2"])
    weight = adapter.tensors["full.classifier.weight"]  # [10, 1280]
    adapter.tensors["full.classifier.weight"] = weight[:, :1000].contiguous()
    archive, _ = encode_adapter(adapter, archive=True)
    r = httpx.post(
        f"{setup['url']}/v1/adapters",
        data={"adapter_id": "misfit"},
        files={"archive": ("misfit.flora", archive)},
        timeout=T,
    )
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert "full.classifier.weight" in message and "[10, 1000]" in message and "1280" in message
    assert httpx.get(f"{setup['url']}/v1/adapters/misfit", timeout=T).status_code == 404
