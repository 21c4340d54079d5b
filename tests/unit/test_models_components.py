"""flora.models building blocks: pooling maths, ImageTransform, the EfficientNet-Lite0
module and its checkpoint key mapping (tiny inputs, random weights, no model packages)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch import nn

from flora.models import EfficientNetLite0, ImageTransform, Pooling, mean_pool, pool
from flora.models.efficientnet import SamePad2d
from flora.models.efficientnet_lite0 import convert_state_dict, rename_key
from flora.models.errors import ModelError

# --- pooling ---------------------------------------------------------------------------


def test_mean_pool_ignores_padding_exactly():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]]])  # [1, 3, 2]
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))


def test_pool_matches_unpadded_reference_and_normalises():
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 4)
    lengths = [5, 2, 3]
    mask = torch.zeros(3, 5, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    out = pool(hidden, mask, Pooling("mean", normalize=True))
    ref = torch.stack([hidden[i, :n].mean(0) for i, n in enumerate(lengths)])
    ref = ref / ref.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(out, ref)
    cls = pool(hidden, mask, Pooling("cls", normalize=False))
    torch.testing.assert_close(cls, hidden[:, 0])


def test_mean_pool_half_precision_accumulates_in_fp32():
    hidden = torch.full((1, 512, 2), 1.0009765625, dtype=torch.float16)  # 1 + 2**-10
    out = mean_pool(hidden, torch.ones(1, 512))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full((1, 2), 1.0009765625))


# --- ImageTransform --------------------------------------------------------------------


def test_transform_values_of_a_constant_image():
    img = Image.new("RGB", (50, 40), (255, 0, 128))
    x = ImageTransform(size=16)(img)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    expected = torch.tensor([1.0, -1.0, (128 / 255 - 0.5) / 0.5])
    torch.testing.assert_close(x.mean(dim=(1, 2)), expected)
    assert float(x.std(dim=(1, 2)).max()) < 1e-6


def test_transform_centre_crops_after_resizing_the_shorter_side():
    # 64x32 image: left half black, right half white. resize=32 keeps the size, crop 32x32
    # takes columns 16..47, so the crop is half black (left) and half white (right).
    img = Image.new("L", (64, 32), 0)
    img.paste(255, (32, 0, 64, 32))
    t = ImageTransform(size=32, resize=32, mean=(0, 0, 0), std=(1, 1, 1), interpolation="bilinear")
    x = t(img)
    assert x.shape == (3, 32, 32)
    assert float(x[:, :, :15].max()) == 0.0 and float(x[:, :, 17:].min()) == 1.0


def test_transform_with_size_and_round_trip():
    t = ImageTransform(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    small = t.with_size(96)
    assert (small.size, small.mean, small.std) == (96, t.mean, t.std)
    assert small(Image.new("RGB", (200, 120))).shape == (3, 96, 96)
    assert ImageTransform.from_dict(t.to_dict()) == t
    with pytest.raises(ValueError, match="unknown"):
        ImageTransform.from_dict({"size": 8, "bogus": 1})
    with pytest.raises(ValueError):
        ImageTransform(size=224, resize=200)


def test_transform_is_deterministic_and_batches():
    torch.manual_seed(0)
    arr = (torch.rand(37, 53, 3) * 255).to(torch.uint8).numpy()
    img = Image.fromarray(arr)
    t = ImageTransform(size=24)
    assert torch.equal(t(img), t(img))
    assert torch.equal(t.batch([img, img])[1], t(img))


# --- EfficientNet-Lite0 ----------------------------------------------------------------


def test_lite0_structure_for_flora():
    model = EfficientNetLite0()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    depthwise = [c for c in convs if c.groups > 1]
    pointwise = [c for c in convs if c.kernel_size == (1, 1)]
    assert (len(convs), len(depthwise), len(pointwise)) == (49, 16, 32)
    assert all(c.groups == c.in_channels == c.out_channels for c in depthwise)
    assert all(type(c) is nn.Conv2d for c in convs)
    assert isinstance(model.classifier, nn.Linear) and model.classifier.in_features == 1280
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    assert EfficientNetLite0(num_classes=10).classifier.out_features == 10


def test_lite0_forward_shape_and_eval_determinism():
    torch.manual_seed(0)
    model = EfficientNetLite0(num_classes=7).eval()
    x = torch.randn(2, 3, 32, 24)
    with torch.no_grad():
        y1, y2 = model(x), model(x)
    assert y1.shape == (2, 7) and torch.equal(y1, y2)
    with torch.no_grad():  # batch rows are independent in eval mode
        torch.testing.assert_close(model(x[1:]), y1[1:])


TF_SAME_CASES = [(224, 3, 2, (0, 1)), (7, 5, 2, (2, 2)), (14, 5, 2, (1, 2)), (9, 3, 1, (1, 1))]


@pytest.mark.parametrize(("n", "k", "s", "pads"), TF_SAME_CASES)
def test_same_padding_follows_tensorflow(n, k, s, pads):
    assert SamePad2d(k, s)._pads(n) == pads
    x = torch.ones(1, 1, n, n)
    out = SamePad2d(k, s)(x)
    assert out.shape[-1] == n + sum(pads)
    assert (out.shape[-1] - k) // s + 1 == -(-n // s)  # output length ceil(n / s)


def test_same_padding_equals_torch_same_for_stride_one():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 5, groups=4, bias=False)
    ref = nn.Conv2d(4, 4, 5, groups=4, bias=False, padding="same")
    ref.weight = conv.weight
    x = torch.randn(1, 4, 9, 11)
    torch.testing.assert_close(conv(SamePad2d(5, 1)(x)), ref(x))


def test_checkpoint_key_mapping():
    assert rename_key("_conv_stem.weight") == "stem.weight"
    assert rename_key("_bn1.running_var") == "head_bn.running_var"
    assert rename_key("_blocks.3._bn1.weight") == "blocks.3.depthwise_bn.weight"
    assert rename_key("_blocks.0._project_conv.weight") == "blocks.0.project.weight"
    assert rename_key("_fc.bias") == "classifier.bias"
    with pytest.raises(ModelError, match="_se_reduce"):
        convert_state_dict({"_blocks.1._se_reduce.weight": torch.zeros(1)})


def test_mapped_checkpoint_fills_every_parameter():
    torch.manual_seed(0)
    ours = EfficientNetLite0().state_dict()
    inverse = {rename_key(k): k for k in _efficientnet_pytorch_keys()}
    assert set(inverse) == set(ours)  # the mapping is a bijection onto our keys
    source = {inverse[k]: v for k, v in ours.items()}
    model = EfficientNetLite0()
    model.load_state_dict(convert_state_dict(source), strict=True)
    assert torch.equal(model.blocks[5].depthwise.weight, ours["blocks.5.depthwise.weight"])


def _efficientnet_pytorch_keys() -> list[str]:
    """Key list of the efficientnet_pytorch Lite0 checkpoint, written out independently."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["_conv_stem.weight", *[f"_bn0.{p}" for p in bn]]
    for i in range(16):
        b = f"_blocks.{i}"
        if i > 0:
            keys += [f"{b}._expand_conv.weight", *[f"{b}._bn0.{p}" for p in bn]]
        keys += [f"{b}._depthwise_conv.weight", *[f"{b}._bn1.{p}" for p in bn]]
        keys += [f"{b}._project_conv.weight", *[f"{b}._bn2.{p}" for p in bn]]
    keys += ["_conv_head.weight", *[f"_bn1.{p}" for p in bn], "_fc.weight", "_fc.bias"]
    return keys
