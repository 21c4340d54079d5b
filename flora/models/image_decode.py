"""Decoded images of any PIL mode -> 8-bit RGB, the one rule for training and serving.

``Image.convert("RGB")`` is right for 8-bit modes (L, P, LA, RGBA, CMYK, ...), but it clips
high-bit-depth grayscale to 0..255: a 16-bit PNG at 12% grey (7710) becomes pure white.
Those modes are scaled to 8 bits first:

- ``I;16`` (``I;16B``, ``I;16L``, ...; 16-bit PNG and TIFF): ``v >> 8``, i.e. the high byte
  (torchvision's ``to_dtype(uint16 -> uint8)`` shifts the same way);
- ``I`` (32-bit integers): taken as 16-bit data, the form older Pillow releases read 16-bit
  PNGs in, so values are clipped to [0, 65535] and then ``>> 8`` (no per-image min-max: a
  pixel value always maps to the same byte);
- ``F`` (32-bit floats): taken as [0, 1], torchvision's convention for float images:
  ``round(255 * clip(v, 0, 1))``, NaN -> 0.

The grey value is then repeated in R, G and B, as ``convert("RGB")`` does for ``L``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def _grey8(image: Image.Image) -> np.ndarray:
    """A high-bit-depth grayscale image as uint8 [H, W] (the rules in the module docstring)."""
    values = np.asarray(image)
    if image.mode == "F":
        scaled = np.rint(255.0 * np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0))
        return scaled.astype(np.uint8)
    return (np.clip(values.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)


def is_high_bit_depth(mode: str) -> bool:
    """Whether ``convert("RGB")`` would clip this mode's values (I;16*, I, F)."""
    return mode in ("I", "F") or mode.startswith("I;16")


def to_rgb(image: Image.Image) -> Image.Image:
    """A new 8-bit RGB image of ``image`` (decoded here if it is not yet)."""
    if is_high_bit_depth(image.mode):
        grey = Image.fromarray(_grey8(image))  # uint8 [H, W]: mode L
        return grey.convert("RGB")
    return image.convert("RGB")
