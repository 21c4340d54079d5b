"""Deterministic image preprocessing shared by training and serving (no torchvision).

x = (crop(resize(img)) / 255 - mean) / std, channels first. ``resize`` is the length the
shorter side is scaled to before a centre crop of ``size`` x ``size`` (ImageNet's usual
224/256 = 0.875 crop fraction).

EfficientNet-Lite0 uses mean = std = (0.5, 0.5, 0.5), i.e. inputs in [-1, 1]: the Lite
models were trained in TensorFlow with (x - 127) / 128, which this matches to 0.4%; with
torchvision's ImageNet mean/std the chelsea photo is no longer a cat (see
tests/integration/test_models.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

_CROP_FRACTION = 0.875
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def _default_resize(size: int) -> int:
    return round(size / _CROP_FRACTION)


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
        img = image.convert("RGB")
        w, h = img.size
        scale = self._resize / min(w, h)
        new_w, new_h = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        img = img.resize((new_w, new_h), _RESAMPLE[self.interpolation])
        left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
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
