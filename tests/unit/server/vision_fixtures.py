"""Tiny image classifier, conv adapters with their own heads, and a stand-in LoadedModel."""

from __future__ import annotations

import asyncio
import copy
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

import flora
from flora.adapter.io import adapter_from_model
from flora.models.image_transform import ImageTransform


class TinyCNN(nn.Module):
    """conv(3->8, stride 2) -> depthwise 3x3 -> pointwise 8->16 -> mean -> classifier."""

    def __init__(self, num_classes: int = 7) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.pointwise = nn.Conv2d(8, 16, 1)
        self.classifier = nn.Linear(16, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, 16]
        h = torch.relu(self.stem(x))
        h = torch.relu(self.depthwise(h))
        return torch.relu(self.pointwise(h)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@dataclass
class TinyVisionLoaded:
    model: Any
    preprocessor: Any
    name: str = "tiny-cnn"
    kind: str = "image-classifier"
    fingerprint: str = "sha256:tiny"
    labels: Any = None
    context_length: Any = None
    source_path: Any = None
    config: dict = field(default_factory=dict)


def make_base(seed: int = 0) -> TinyCNN:
    torch.manual_seed(seed)
    return TinyCNN().eval()


def make_loaded(seed: int = 0, size: int = 16) -> TinyVisionLoaded:
    return TinyVisionLoaded(
        model=make_base(seed),
        preprocessor=ImageTransform(size=size),
        labels=[f"base{i}" for i in range(7)],
    )


def make_conv_adapter(seed: int, num_labels: int | None, image_size: int | None = None) -> Any:
    """A conv adapter on every conv with random non-zero cores; with `num_labels`, a new
    `classifier` head saved whole (as flora-train image-classification does)."""
    torch.manual_seed(100 + seed)
    model = copy.deepcopy(make_base())
    train = []
    if num_labels is not None:
        model.classifier = nn.Linear(16, num_labels)
        train = ["classifier"]
    config = flora.FloraConfig(
        target_modules=["stem", "depthwise", "pointwise"],
        rank=4,
        scale=2.0,
        train_modules=train,
    )
    flora.inject(model, config)
    with torch.no_grad():
        for _, layer in flora.adapter_layers(model):
            layer.core.normal_(0.0, 0.2)
    labels = [f"a{seed}-{i}" for i in range(num_labels)] if num_labels else None
    metadata = {"image_size": image_size} if image_size else {}
    return adapter_from_model(
        model, "tiny-cnn", task="image-classification", labels=labels, **metadata
    )


def reference_logits(
    adapter: Any | None, image: Image.Image, transform: ImageTransform
) -> torch.Tensor:
    """Offline: flora.apply_adapter on a fresh base + the same preprocessing. -> [C]"""
    model = make_base()
    if adapter is not None:
        flora.apply_adapter(model, adapter, check_fingerprint=False)
    with torch.no_grad():
        return model(transform(image).unsqueeze(0))[0]


def random_image(seed: int, size: tuple[int, int] = (23, 19)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def run(coro: Any) -> Any:
    return asyncio.run(coro)
