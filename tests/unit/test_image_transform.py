"""ImageTransform resamples only the region its centre crop keeps: the same pixels as
resizing the whole image and cropping (a plain reference below), at a cost bounded by the
crop whatever the aspect ratio."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from flora.models.image_decode import to_rgb
from flora.models.image_transform import _RESAMPLE, ImageTransform

RAW = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # outputs are pixel / 255
TRANSFORMS = [
    ImageTransform(**RAW),  # 224 crop of 256, bicubic (EfficientNet-Lite0)
    ImageTransform(size=16, **RAW),
    ImageTransform(size=64, interpolation="bilinear", **RAW),
    ImageTransform(size=32, resize=32, **RAW),  # crop = the shorter side
]


def _levels(x: torch.Tensor) -> np.ndarray:
    """[3, S, S] in [0, 1] -> [S, S, 3] 8-bit levels."""
    return np.rint(x.permute(1, 2, 0).numpy() * 255).astype(np.int16)


def _resize_then_crop(image: Image.Image, t: ImageTransform, *, pillow_order: bool) -> np.ndarray:
    """The reference: resize the whole image (shorter side to `t.resize`), crop the centre.
    `pillow_order=False` runs the horizontal pass, then the vertical one, as separate resizes
    (the order the transform fixes, and every Pillow before 13 used); True lets Pillow's 2-D
    resize pick (Pillow 13 sometimes runs portrait images vertical-first, which rounds its
    8-bit intermediate differently)."""
    img = image.convert("RGB")
    w, h = img.size
    resize = t.resize if t.resize is not None else round(t.size / 0.875)
    scale = resize / min(w, h)
    new_w, new_h = max(t.size, round(w * scale)), max(t.size, round(h * scale))
    r = _RESAMPLE[t.interpolation]
    if pillow_order:
        img = img.resize((new_w, new_h), r)
    else:
        img = img.resize((new_w, h), r).resize((new_w, new_h), r)
    left, top = (new_w - t.size) // 2, (new_h - t.size) // 2
    crop = img.crop((left, top, left + t.size, top + t.size))
    return np.asarray(crop).astype(np.int16)


def _images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    coffee = Image.fromarray(skdata.coffee())  # 600 x 400
    return {
        "chelsea 451x300": Image.fromarray(skdata.chelsea()),
        "coffee 600x400": coffee,
        "coffee portrait 400x600": coffee.transpose(Image.Transpose.ROTATE_90),
        "noise 23x19 (upscaled)": Image.fromarray(rng.integers(0, 256, (19, 23, 3), np.uint8)),
        "noise 37x301": Image.fromarray(rng.integers(0, 256, (301, 37, 3), np.uint8)),
        "noise 97x97": Image.fromarray(rng.integers(0, 256, (97, 97, 3), np.uint8)),
    }


@pytest.mark.parametrize("t", TRANSFORMS, ids=lambda t: f"{t.size}-{t.interpolation}")
def test_equals_resize_then_crop_on_ordinary_images(t: ImageTransform) -> None:
    # Pillow takes resize boxes as float32, so a region's first pixel sits up to ~1e-6 px off
    # where it sits in the whole-image resize: a coefficient may round to the next 2^-22 and
    # an output to the next 8-bit level. Measured: at most 2 levels, on under 0.5% of values.
    for name, image in _images().items():
        got = _levels(t(image))
        ref = _resize_then_crop(image, t, pillow_order=False)
        assert got.shape == ref.shape == (t.size, t.size, 3), name
        diff = np.abs(got - ref)
        assert diff.max() <= 2, (name, diff.max())
        assert (diff > 0).mean() < 0.01, (name, (diff > 0).mean())
        if image.width >= image.height:  # Pillow's own 2-D resize runs these horizontal-first
            pillow = np.abs(got - _resize_then_crop(image, t, pillow_order=True))
            assert pillow.max() <= 2 and (pillow > 0).mean() < 0.01, name


def test_chelsea_at_the_lite0_settings_matches_the_old_transform_closely() -> None:
    # The preprocessing every Lite0 request and adapter went through before: same pixels up
    # to the float32 rounding above.
    t = ImageTransform(**RAW)
    image = Image.fromarray(skdata.chelsea())
    diff = np.abs(_levels(t(image)) - _resize_then_crop(image, t, pillow_order=True))
    assert diff.max() <= 1 and (diff > 0).sum() < 0.002 * diff.size


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_any_mode_equals_converting_to_rgb_first(mode: str) -> None:
    # The region is cropped before it is converted: a per-pixel conversion, so no change.
    # The conversion is decoding's (`to_rgb`: 16-bit grey scaled to 8 bits, not clipped).
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (41, 67, 3), np.uint8))
    image = rgb.convert(mode)
    t = ImageTransform(size=24)
    assert torch.equal(t(image), t(to_rgb(image)))


@pytest.mark.parametrize(
    ("width", "height"),
    [(1, 1 << 24), (1 << 24, 1), (16, 1 << 20), (64, 1 << 18)],  # all 16,777,216 pixels
)
def test_extreme_aspect_ratios_resample_only_the_crop(
    width: int, height: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: 1 x 16M was resized to 256 x 4G (OverflowError in Pillow), 16 x 1M to
    # 256 x 16M (17 GB), 64 x 256K to 256 x 1M (1 GB, seconds). Now every image Pillow makes
    # along the way is at most crop-wide and crop- or (short side + filter reach)-long.
    long = max(width, height)
    band = np.zeros(long, np.uint8)
    band[long // 2 - 4096 : long // 2 + 4096] = 255  # white middle, black ends
    pixels = np.broadcast_to(band[:, None] if height > width else band[None, :], (height, width))
    image = Image.fromarray(np.ascontiguousarray(pixels), "L")
    t = ImageTransform(**RAW)
    bound = t.size * max(t.size, min(width, height) + 16)

    def guarded(method: str):  # type: ignore[no-untyped-def]
        real = getattr(Image.Image, method)

        def call(self: Image.Image, *args, **kwargs):  # type: ignore[no-untyped-def]
            out = real(self, *args, **kwargs)
            assert out.width * out.height <= bound, (method, out.size)
            return out

        return call

    real_resize = Image.Image.resize

    def resize(self: Image.Image, size, *args, **kwargs):  # type: ignore[no-untyped-def]
        assert size[0] * size[1] <= bound, ("resize", size)  # before allocating it
        return real_resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", resize)
    monkeypatch.setattr(Image.Image, "crop", guarded("crop"))
    monkeypatch.setattr(Image.Image, "convert", guarded("convert"))
    x = t(image)
    assert x.shape == (3, 224, 224)
    assert torch.equal(x, torch.ones_like(x))  # the crop sees only the white middle
