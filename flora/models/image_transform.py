"""Deterministic image preprocessing shared by training and serving (no torchvision).

x = (crop(resize(img)) / 255 - mean) / std, channels first. ``resize`` is the length the
shorter side is scaled to before a centre crop of ``size`` x ``size`` (ImageNet's usual
224/256 = 0.875 crop fraction), as torchvision's ``Resize`` + ``CenterCrop`` do.

The crop keeps only a ``size`` x ``size`` window of the resized image, so the transform
resamples only the source region under that window (plus the filter's reach) instead of
resizing the whole image first: the work is bounded by the crop's share of the shorter side
whatever the aspect ratio (a 1 x 16M-pixel strip would otherwise be resized to 256 x 4G).
It is the same resampling, one axis at a time in the order Pillow uses for the whole image
(horizontal, then vertical); results equal resize-then-crop up to one 8-bit level on a few
pixels (Pillow takes box coordinates as float32).

EfficientNet-Lite0 uses mean = std = (0.5, 0.5, 0.5), i.e. inputs in [-1, 1]: the Lite
models were trained in TensorFlow with (x - 127) / 128, which this matches to 0.4%; with
torchvision's ImageNet mean/std the chelsea photo is no longer a cat (see
tests/integration/test_models.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from flora.models.image_decode import to_rgb

_CROP_FRACTION = 0.875
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
# How far each of Pillow's filters reaches, in source pixels at scale 1 (Resample.c).
_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}


def _default_resize(size: int) -> int:
    return round(size / _CROP_FRACTION)


def crop_box(width: int, height: int, size: int, resize: int) -> tuple[float, ...]:
    """The region (left, top, right, bottom) of a ``width`` x ``height`` source, in source
    pixels, that the centre ``size`` x ``size`` crop of the image resized to shorter side
    ``resize`` shows. Resized pixel j covers source [j, j + 1) * (source / resized)."""
    scale = resize / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    sx, sy = width / new_w, height / new_h
    right, bottom = min(width, (left + size) * sx), min(height, (top + size) * sy)
    return left * sx, top * sy, right, bottom


def _reach(lo: float, hi: float, out: int, support: float, limit: int) -> tuple[int, int]:
    """The source pixels [first, last) that resampling [lo, hi) to ``out`` pixels reads: the
    filter reaches ``support`` pixels, times the scale when downscaling (one more for
    Pillow's rounding), clipped to the image."""
    reach = support * max((hi - lo) / out, 1.0)
    return max(0, math.floor(lo - reach) - 1), min(limit, math.ceil(hi + reach) + 1)


def resample_region(
    image: Image.Image, box: tuple[float, ...], size: int, interpolation: str
) -> Image.Image:
    """``box`` of ``image`` resampled to ``size`` x ``size`` RGB: the same pixels as resizing
    the whole image and cropping, at the cost of the region only.

    Crops the pixels the two passes read, converts them to RGB, then resamples horizontally
    and vertically as two 1-D resizes (each pass alone, so the order is fixed: Pillow 13
    picks it from the sizes of a 2-D resize, and those differ between the whole image and
    the region).
    """
    x0, y0, x1, y1 = box
    support, resample = _SUPPORT[interpolation], _RESAMPLE[interpolation]
    xa, xb = _reach(x0, x1, size, support, image.width)
    ya, yb = _reach(y0, y1, size, support, image.height)
    region = image.crop((xa, ya, xb, yb))
    region = region if region.mode == "RGB" else to_rgb(region)
    rows = yb - ya
    region = region.resize((size, rows), resample, box=(x0 - xa, 0, x1 - xa, rows))
    return region.resize((size, size), resample, box=(0, y0 - ya, size, y1 - ya))


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> float32 tensor [3, size, size].

    Args:
        size: side of the square centre crop.
        mean, std: per-channel normalisation on the [0, 1] scale.
        resize: shorter side before cropping; default ``round(size / 0.875)``.
        interpolation: ``"bilinear"`` or ``"bicubic"`` (PIL's, antialiased).
    """

    size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resize: int | None = None
    interpolation: str = "bicubic"
    _resize: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError("size must be positive")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need 3 values, std > 0")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}")
        resize = _default_resize(self.size) if self.resize is None else self.resize
        if resize < self.size:
            raise ValueError("resize must be >= size (the crop must fit)")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "_resize", resize)

    def with_size(self, size: int) -> ImageTransform:
        """Same normalisation at another crop size (resize scales with it)."""
        return replace(self, size=size, resize=None)

    def __call__(self, image: Image.Image) -> Tensor:
        """image: any PIL mode (converted to RGB) -> [3, size, size] float32."""
        box = crop_box(image.width, image.height, self.size, self._resize)
        img = resample_region(image, box, self.size, self.interpolation)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)  # [H, W, 3]
        x = x.permute(2, 0, 1)  # [3, H, W]
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return ((x - mean) / std).contiguous()

    def batch(self, images: Sequence[Image.Image]) -> Tensor:
        """Stack transformed images: [B, 3, size, size]."""
        return torch.stack([self(im) for im in images])

    def to_dict(self) -> dict[str, Any]:
        """JSON-able settings (``from_dict`` inverts it)."""
        data = asdict(self)
        data.pop("_resize", None)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageTransform:
        """Build from :meth:`to_dict` output; unknown keys are an error."""
        allowed = {"size", "mean", "std", "resize", "interpolation"}
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"unknown ImageTransform fields {sorted(unknown)}")
        kwargs = dict(data)
        for key in ("mean", "std"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)
