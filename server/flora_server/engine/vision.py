"""`VisionEngine`: image classification with many conv adapters in one forward.

Per batch: every image goes through its adapter's `ImageTransform` (the base's, or the one
`flora-train image-classification` recorded in the adapter's metadata, e.g. 64 px for
MNIST); images of one size share a forward whose conv layers route rows per adapter
(`flora.serving.ServedConv`: per-adapter segments with merged weights `W + dW_k`, or one
grouped conv with per-row weights when many adapters share a batch); then each adapter's
own head runs on its rows (`engine/heads.py`) and the scores are `softmax(logits)`.

Preprocessing runs off the worker thread where it can: `serve` transforms the images in a
thread (`PreparedImage`) with the transform the request will most likely need (the base's,
or the one this adapter used last), before the request is queued. The worker uses those
pixels only when the transform it resolves at admission is the same, and transforms the
image itself otherwise, so a wrong guess costs time, never a wrong answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import nn

from flora.models.image_transform import ImageTransform
from flora.serving.base import ServingPolicy
from flora.serving.model import ServingModel
from flora_server.engine.batch_engine import BatchEngine, BatchJob
from flora_server.engine.heads import HEAD_NAME, HeadedRuntime, LinearHead, apply_heads
from flora_server.engine.protocol import AdapterSource, InvalidRequestError
from flora_server.engine.runtime import torch_factor_dtype


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    score: float


def top_predictions(logits: torch.Tensor, labels: Sequence[str], top_k: int) -> list[Prediction]:
    """The `top_k` classes of `softmax(logits)` (fp32), best first. logits: [C]."""
    probs = torch.softmax(logits.float(), dim=-1)
    scores, index = probs.topk(min(top_k, probs.shape[-1]))
    return [
        Prediction(labels[i], i, s) for i, s in zip(index.tolist(), scores.tolist(), strict=True)
    ]


@dataclass(frozen=True)
class PreparedImage:
    """A decoded image and its pixels under `transform`, computed before it was queued."""

    image: Image.Image
    transform: ImageTransform
    pixels: torch.Tensor  # [3, S, S] float32, S = transform.size


def prepare_images(images: Sequence[Any], transform: ImageTransform) -> list[PreparedImage]:
    """Transform each PIL image (an already prepared one is transformed again from its
    image): the work `serve` moves off the worker thread."""
    out = []
    for item in images:
        image = item.image if isinstance(item, PreparedImage) else item
        out.append(PreparedImage(image, transform, transform(image)))
    return out


def image_pixels(item: Any, transform: ImageTransform) -> torch.Tensor:
    """`item` (a PIL image or a `PreparedImage`) under `transform`: [3, S, S]. Prepared pixels
    are used only when they were made by an equal transform."""
    if isinstance(item, PreparedImage):
        return item.pixels if item.transform == transform else transform(item.image)
    return transform(item)


# The largest crop an adapter's metadata may ask for: every image of its requests becomes
# a [3, S, S] float32 tensor (12 MiB at 1024), so an uploaded adapter asking for 100,000
# would make each request allocate 120 GB.
MAX_ADAPTER_IMAGE_SIZE = 1024


def adapter_transform(base: ImageTransform, metadata: dict[str, Any]) -> ImageTransform:
    """The preprocessing an adapter was trained with: its saved `image_transform`, else its
    `image_size` with the base's normalisation, else the base's. Raises ValueError (or
    TypeError) for metadata that is not a transform, or one larger than
    `MAX_ADAPTER_IMAGE_SIZE`."""
    saved = metadata.get("image_transform")
    size = metadata.get("image_size")
    if isinstance(saved, dict):
        transform = ImageTransform.from_dict(saved)
    elif size is not None:
        transform = base.with_size(int(size))
    else:
        return base
    if transform.size > MAX_ADAPTER_IMAGE_SIZE:
        raise ValueError(
            f"it asks for {transform.size}-pixel images; at most {MAX_ADAPTER_IMAGE_SIZE} "
            "are served"
        )
    return transform


class VisionEngine(BatchEngine):
    """`BatchEngine` over a `flora.models.LoadedModel` of kind "image-classifier" whose
    final layer is an `nn.Linear` named `classifier`. Requests: `inputs` are RGB PIL
    images, `options` is `top_k`; the result is one list of `Prediction` per image."""

    kind = "image-classifier"
    # Adapters whose last transform `serve` remembers as its guess (most recent kept).
    _MAX_REMEMBERED = 256

    def __init__(
        self,
        loaded: Any,
        source: AdapterSource,
        *,
        max_slots: int = 8,
        policy: ServingPolicy | None = None,
        factor_dtype: str = "auto",
        **kwargs: Any,
    ) -> None:
        model: nn.Module = loaded.model
        head = getattr(model, HEAD_NAME, None)
        if not isinstance(head, nn.Linear):
            raise ValueError(f"{loaded.name}: the image classifier has no Linear {HEAD_NAME!r}")
        labels = list(loaded.labels or [f"LABEL_{i}" for i in range(head.out_features)])
        self.base_head = LinearHead(
            head.weight.detach(), None if head.bias is None else head.bias.detach(), labels
        )
        # The body runs once for the batch; heads run per adapter on their rows.
        setattr(model, HEAD_NAME, nn.Identity())
        self.model = model.eval()
        self.transform: ImageTransform = loaded.preprocessor
        serving = ServingModel(
            model, max_slots=max_slots, policy=policy, factor_dtype=torch_factor_dtype(factor_dtype)
        )
        self.device, self.dtype = serving.device, serving.dtype
        super().__init__(
            model_name=loaded.name,
            runtime=HeadedRuntime(serving, head.in_features),
            source=source,
            max_slots=max_slots,
            **kwargs,
        )
        self.heads: HeadedRuntime = self.runtime  # type: ignore[assignment]
        # adapter id -> the transform its last batch used; written by the worker only.
        self._last_transform: dict[str, ImageTransform] = {}

    async def serve(
        self,
        adapter_id: str | None,
        inputs: list[Any],
        options: Any = None,
        *,
        timeout: float | None = None,
    ) -> tuple[Any, str | None]:
        """`BatchEngine.serve`, with the images transformed in a thread first when the
        transform is known (see the module docstring): a request of many large images then
        holds the worker for its forward only, not for its preprocessing as well."""
        transform = self.transform_hint(adapter_id)
        if transform is not None and inputs:
            inputs = await asyncio.to_thread(prepare_images, inputs, transform)
        return await super().serve(adapter_id, inputs, options, timeout=timeout)

    def check_adapter(self, adapter: Any) -> None:
        """`BatchEngine.check_adapter`, and its preprocessing must be one this engine
        serves (`adapter_transform`), so a bad one is a 422 at upload."""
        super().check_adapter(adapter)
        try:
            adapter_transform(self.transform, adapter.metadata)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"the adapter's image_transform is invalid: {exc}") from None

    def transform_hint(self, adapter_id: str | None) -> ImageTransform | None:
        """The transform a request for `adapter_id` most likely needs: the base's for none,
        the one the adapter's last batch used, or None (unknown yet). A guess only: the
        adapter may be replaced before the request runs."""
        if adapter_id is None:
            return self.transform
        return self._last_transform.get(adapter_id)

    def _remember(self, adapter_id: str, transform: ImageTransform) -> None:
        remembered = self._last_transform
        remembered.pop(adapter_id, None)  # re-insert: the dict's order is recency
        remembered[adapter_id] = transform
        if len(remembered) > self._MAX_REMEMBERED:
            remembered.pop(next(iter(remembered)))

    def warm_up(self) -> None:
        size = self.transform.size
        self.model(torch.zeros(1, 3, size, size, device=self.device, dtype=self.dtype))

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return getattr(out, "logits", out)  # HF classifiers wrap the output

    def run_batch(self, jobs: list[BatchJob]) -> list[Any]:
        results: list[Any] = [[None] * len(job.inputs) for job in jobs]
        groups: dict[ImageTransform, list[tuple[int, int]]] = {}
        for j, job in enumerate(jobs):
            info = self.heads.info(job.slot)
            try:
                transform = (
                    self.transform
                    if info is None
                    else adapter_transform(self.transform, info.metadata)
                )
            except (TypeError, ValueError) as exc:
                results[j] = InvalidRequestError(
                    f"the adapter's image_transform is invalid: {exc}", param="adapter_id"
                )
                continue
            if job.adapter_id is not None:
                self._remember(job.adapter_id, transform)
            groups.setdefault(transform, []).extend((j, i) for i in range(len(job.inputs)))
        for transform, members in groups.items():
            x = torch.stack([image_pixels(jobs[j].inputs[i], transform) for j, i in members])
            # x: [N, 3, S, S]
            slots = [jobs[j].slot for j, _ in members]
            self.heads.set_routing(slots)
            features = self._features(x.to(device=self.device, dtype=self.dtype))  # [N, F]
            heads = {s: self._head(s) for s in set(slots)}
            logits = apply_heads(features, slots, heads)
            for (j, i), row in zip(members, logits, strict=True):
                top_k = int(jobs[j].options or 5)
                results[j][i] = top_predictions(row, heads[jobs[j].slot].labels, top_k)
        return results

    def _head(self, slot: int | None) -> LinearHead:
        info = self.heads.info(slot)
        return self.base_head if info is None or info.head is None else info.head
