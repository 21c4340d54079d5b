"""EfficientNet-Lite0 as a plain PyTorch module (no timm, no torchvision).

Lite0 = EfficientNet-B0 without squeeze-excitation, with ReLU6 instead of swish and a
fixed 32-channel stem / 1280-channel head. Every convolution is a plain ``nn.Conv2d``
(depthwise ones with ``groups = channels``) so FLoRA can wrap it; TensorFlow "SAME"
padding, which the ported weights expect, is a separate :class:`SamePad2d` before each
strided or odd-kernel conv rather than a custom conv class. BatchNorm is kept (frozen in
eval mode).

49 convs: stem, 16 depthwise, 15 expand + 16 project pointwise, head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

BN_EPS = 1e-3  # TF/efficientnet_pytorch batch-norm epsilon used for the ported weights
BN_MOMENTUM = 0.01  # torch convention (TF decay 0.99)


@dataclass(frozen=True)
class StageSpec:
    """One stage: ``repeats`` MBConv blocks; the first has ``stride`` and changes width."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    out_channels: int


# EfficientNet-B0 stages (Lite0 uses them unscaled).
LITE0_STAGES: tuple[StageSpec, ...] = (
    StageSpec(1, 3, 1, 1, 16),
    StageSpec(2, 3, 2, 6, 24),
    StageSpec(2, 5, 2, 6, 40),
    StageSpec(3, 3, 2, 6, 80),
    StageSpec(3, 5, 1, 6, 112),
    StageSpec(4, 5, 2, 6, 192),
    StageSpec(1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


class SamePad2d(nn.Module):
    """TensorFlow "SAME" zero padding for a following conv with ``kernel`` and ``stride``.

    For input length n: out = ceil(n / s), total = max((out - 1) s + k - n, 0),
    before = total // 2, after = total - before (TF puts the extra pixel after).
    """

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def _pads(self, n: int) -> tuple[int, int]:
        out = math.ceil(n / self.stride)
        total = max((out - 1) * self.stride + self.kernel - n, 0)
        return total // 2, total - total // 2

    def forward(self, x: Tensor) -> Tensor:  # x: [B, C, H, W]
        top, bottom = self._pads(x.shape[-2])
        left, right = self._pads(x.shape[-1])
        if top == bottom == left == right == 0:
            return x
        return F.pad(x, (left, right, top, bottom))

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}"


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> kxk depthwise -> 1x1 project (+ identity skip).

    The skip applies when stride is 1 and width is unchanged. No squeeze-excitation in Lite.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self.expand = nn.Conv2d(cin, mid, 1, bias=False)
            self.expand_bn = _bn(mid)
        self.depthwise_pad = SamePad2d(kernel, stride)
        self.depthwise = nn.Conv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self.depthwise_bn = _bn(mid)
        self.project = nn.Conv2d(mid, cout, 1, bias=False)
        self.project_bn = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:  # x: [B, cin, H, W]
        h = x
        if self.has_expand:
            h = F.relu6(self.expand_bn(self.expand(h)))
        h = F.relu6(self.depthwise_bn(self.depthwise(self.depthwise_pad(h))))
        h = self.project_bn(self.project(h))  # linear bottleneck: no activation
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 classifier: [B, 3, H, W] (normalised to [-1, 1]) -> logits [B, C].

    ``classifier`` is the final ``nn.Linear``, so training can swap or fully train the
    head (``FloraConfig(train_modules=["classifier"])``).
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self.stem_pad = SamePad2d(3, 2)
        self.stem = nn.Conv2d(3, STEM_CHANNELS, 3, stride=2, bias=False)
        self.stem_bn = _bn(STEM_CHANNELS)
        blocks: list[nn.Module] = []
        cin = STEM_CHANNELS
        for stage in LITE0_STAGES:
            for i in range(stage.repeats):
                stride = stage.stride if i == 0 else 1
                blocks.append(MBConv(cin, stage.out_channels, stage.kernel, stride, stage.expand))
                cin = stage.out_channels
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(cin, HEAD_CHANNELS, 1, bias=False)
        self.head_bn = _bn(HEAD_CHANNELS)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Pooled features before the classifier: [B, 3, H, W] -> [B, 1280]."""
        h = F.relu6(self.stem_bn(self.stem(self.stem_pad(x))))
        h = self.blocks(h)
        h = F.relu6(self.head_bn(self.head(h)))
        return h.mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:  # x: [B, 3, H, W] -> [B, num_classes]
        return self.classifier(self.dropout(self.features(x)))
