"""flora-train's images: one 8-bit rule for high-bit-depth images in training and serving,
images kept encoded until a batch needs them, and the image-folder layout (no image is
dropped without a word)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flora.models import ImageTransform
from flora.models.image_decode import to_rgb
from flora.train.errors import DataError
from flora.train.image_data import EncodedImage, load_image_labels
from flora_server.images import decode_image

GREY16 = np.array([[0, 255, 256, 7710, 65535]], np.uint16)  # 7710 = 30 * 257: 12% grey


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _refused(load, path) -> str:
    with pytest.raises(DataError) as err:
        load(path)
    return str(err.value)


# --- 16- and 32-bit images: scaled by bit depth, not clipped to white ------------------------


def test_high_bit_depth_images_scale_to_8_bits():
    grey = np.asarray(to_rgb(Image.fromarray(GREY16)))
    assert grey[..., 0].tolist() == [[0, 0, 1, 30, 255]]  # I;16: v >> 8
    assert (grey == grey[..., :1]).all()  # the grey value in R, G and B
    ints = Image.fromarray(np.array([[-5, 1000, 70000, 65535]], np.int32))
    assert np.asarray(to_rgb(ints))[..., 0].tolist() == [[0, 3, 255, 255]]  # I: 16-bit, clipped
    floats = Image.fromarray(np.array([[0.5, -1.0, 2.0, np.nan, 0.2]], np.float32))
    assert np.asarray(to_rgb(floats))[..., 0].tolist() == [[128, 0, 255, 0, 51]]  # F: [0, 1]
    rgba = Image.new("RGBA", (1, 1), (10, 20, 30, 0))
    assert np.asarray(to_rgb(rgba)).tolist() == [[[10, 20, 30]]]  # 8-bit modes: convert()


def test_a_16_bit_png_trains_and_serves_as_the_same_dark_grey(tmp_path):
    data = _png(GREY16)
    (tmp_path / "g16.png").write_bytes(data)
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    trained = np.asarray(EncodedImage(tmp_path / "g16.png", "g16.png").decode())
    served = np.asarray(decode_image(data, max_pixels=100, max_bytes=10_000))
    assert trained[..., 1].tolist() == [[0, 0, 1, 30, 255]]
    assert np.array_equal(trained, served)


# --- images kept encoded, decoded per batch -------------------------------------------------


def test_loaded_images_stay_encoded_and_transform_exactly_as_decoded_ones(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.fromarray(rng.integers(0, 256, (30, 41, 3), np.uint8)).save(tmp_path / cls / "0.png")
    loaded = load_image_labels(tmp_path)
    assert loaded is not None
    image, label = loaded[0]
    assert isinstance(image, EncodedImage) and label == "a"
    assert image.source == tmp_path / "a" / "0.png" and image.size == (41, 30)
    with Image.open(tmp_path / "a" / "0.png") as im:
        decoded = im.convert("RGB")
    transform = ImageTransform(size=16)
    assert torch.equal(transform(image), transform(decoded))
    assert torch.equal(transform.batch([image]), transform.batch([decoded]))
    # A 16-bit image, cropped in its own mode and converted there, equals decoding first.
    (tmp_path / "g16.png").write_bytes(_png(GREY16))
    grey = EncodedImage(tmp_path / "g16.png", "g16.png")
    assert torch.equal(ImageTransform(size=4)(grey), ImageTransform(size=4)(grey.decode()))
    (tmp_path / "a" / "0.png").unlink()  # read when a batch needs it, not held decoded
    with pytest.raises(DataError) as err:
        transform(image)
    assert str(err.value) == f"{tmp_path / 'a' / '0.png'}: image not found"


def test_hf_image_bytes_stay_encoded(tmp_path):
    datasets = pytest.importorskip("datasets")
    pixels = [np.full((3, 5, 3), v, np.uint8) for v in (10, 200)]
    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(p) for p in pixels], "label": [0, 1]},
        features=datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"])}
        ),
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    loaded = load_image_labels(tmp_path / "ds")
    assert loaded is not None and [label for _, label in loaded] == ["0", "1"]
    assert all(isinstance(im, EncodedImage) and isinstance(im.source, bytes) for im, _ in loaded)
    assert [np.asarray(im.decode()).tolist() for im, _ in loaded] == [p.tolist() for p in pixels]


def test_decompression_bombs_are_one_error(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        Image.new("L", (4, 4)).save(tmp_path / "imgs" / cls / "small.png")
    Image.new("L", (30, 20)).save(tmp_path / "imgs" / "b" / "big.png")
    cells = [{"bytes": _png(np.zeros((20, 30), np.uint8)), "path": None}] * 2
    datasets.Dataset.from_dict({"image": cells, "label": [0, 1]}).to_parquet(tmp_path / "p.parquet")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # refused above 2 x 100 pixels
    limit = "Image size (600 pixels) exceeds limit of 200 pixels, could be decompression bomb"
    big = tmp_path / "imgs" / "b" / "big.png"
    assert (
        _refused(load_image_labels, tmp_path / "imgs")
        == f"{big}: too many pixels ({limit} DOS attack.)"
    )
    assert _refused(load_image_labels, tmp_path / "p.parquet") == (
        f"{tmp_path / 'p.parquet'}: train[0]: too many pixels ({limit} DOS attack.)"
    )


# --- the image-folder layout ------------------------------------------------------------------


def _folder(root: Path, files: list[str], dirs: tuple[str, ...] = ()) -> Path:
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (2, 2)).save(root / name)
    for name in dirs:
        (root / name).mkdir(parents=True)
    return root


def test_class_is_the_first_level_folder_and_images_are_found_at_any_depth(tmp_path):
    root = _folder(
        tmp_path,
        ["b/1.png", "a/2.PNG", "a/sub/deeper/3.jpg", "a/sub/0.png", "a/.hidden.png", ".x/4.png"],
    )
    (root / "a" / "notes.txt").write_text("not an image")
    loaded = load_image_labels(root)
    assert loaded is not None
    assert all(isinstance(im, EncodedImage) for im, _ in loaded)
    got = [(Path(im.name).relative_to(root).as_posix(), label) for im, label in loaded]
    assert got == [
        ("a/2.PNG", "a"),
        ("a/sub/0.png", "a"),
        ("a/sub/deeper/3.jpg", "a"),
        ("b/1.png", "b"),
    ]


def test_an_image_outside_the_class_folders_is_refused(tmp_path):
    root = _folder(tmp_path, ["a/1.png", "b/1.png", "loose.png"])
    assert _refused(load_image_labels, root) == (
        f"{root / 'loose.png'}: an image outside the class sub-folders (no class)"
    )


def test_an_empty_class_folder_is_refused(tmp_path):
    root = _folder(tmp_path, ["a/1.png", "b/1.png"], dirs=("c/sub",))
    (root / "c" / "readme.txt").write_text("no images here")
    assert _refused(load_image_labels, root) == f"{root / 'c'}: class folder 'c' holds no images"


def test_image_transform_scales_a_raw_high_bit_depth_image_as_decoding_does():
    """An I;16 image handed to ImageTransform directly (not decoded first) is not clipped
    to white: the transform converts with the same rule."""
    raw = Image.fromarray(np.full((8, 8), 7710, np.uint16))  # 12% grey, mode I;16
    transform = ImageTransform(size=4, resize=4)
    torch.testing.assert_close(transform(raw), transform(to_rgb(raw)), rtol=0, atol=0)
