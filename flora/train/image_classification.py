"""Recipe ``image-classification``: FLoRA on conv and linear layers plus a new head.

Data: ``builtin:mnist5k``, a folder with one sub-folder of images per class, or a CSV
``path,label``. Images go through the base's ``ImageTransform`` at ``--image-size``
(default: the dataset's hint, e.g. 64 px for MNIST, else the base's size); the size is
saved in the adapter metadata so serving can preprocess the same way. The base's
``classifier`` Linear is replaced by a new one with one output per label, trained fully
(``train_modules``); batch-norm statistics stay frozen.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flora.config import FloraConfig
from flora.injection import inject
from flora.models.image_transform import ImageTransform
from flora.models.types import LoadedModel, a_kind
from flora.train.batches import eval_chunks, on_device
from flora.train.errors import TrainError
from flora.train.heads import HEAD_NAME, accuracy, adaptable_names, freeze_batchnorm, replace_head
from flora.train.image_data import load_image_labels
from flora.train.options import RecipeDefaults, TrainOptions
from flora.train.recipe import Batch, TrainTask
from flora.train.sources import labelled_data

AUTO = "auto"  # every Conv1d/2d/3d and Linear except the head
EVAL_BATCH = 100


class ImageClassificationRecipe:
    """A new head + FLoRA conv/linear adapters on an image classifier."""

    name = "image-classification"
    description = (
        "image folder / CSV path,label / builtin:mnist5k -> new head + conv/linear adapters"
    )
    # The new head trains whole (`train_modules`): --targets naming it and --export peft
    # are refused before the base loads (`TrainOptions.resolved`).
    defaults = RecipeDefaults(
        targets=AUTO, lr=1e-3, batch_size=32, epochs=1.0, scale=1.0, train_modules=(HEAD_NAME,)
    )

    def prepare(self, options: TrainOptions, loaded: LoadedModel) -> TrainTask:
        if loaded.kind != "image-classifier":
            raise TrainError(
                f"{loaded.name} is {a_kind(loaded.kind)}; "
                "image-classification needs an image classifier"
            )
        data = labelled_data(options, "image", load_image_labels)
        model = loaded.model
        replace_head(model, len(data.labels))
        targets = options.targets
        if targets == AUTO:
            targets = adaptable_names(
                model, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear), HEAD_NAME
            )
        assert targets is not None and options.scale is not None  # resolved options
        config = FloraConfig(
            target_modules=targets,
            rank=options.rank,
            kernel_rank=options.kernel_rank,
            scale=options.scale,
            train_modules=[HEAD_NAME],
        )
        try:
            inject(model, config)
        except ValueError as exc:
            raise TrainError(f"--targets: {exc}") from None
        base_transform = loaded.preprocessor
        if not isinstance(base_transform, ImageTransform):
            raise TrainError(f"{loaded.name} has no ImageTransform preprocessor")
        size = options.image_size
        if size is None:  # not given; 0 or less never gets here (TrainOptions refuses it)
            size = int(data.hints.get("image_size", base_transform.size))
        transform = base_transform.with_size(size)

        def collate_cpu(examples: list[tuple[Any, int]]) -> Batch:
            return {
                "pixel_values": transform.batch([im for im, _ in examples]),  # [B, 3, S, S]
                "labels": torch.tensor([y for _, y in examples]),  # [B]
            }

        collate = on_device(collate_cpu, torch.device(options.device))
        progress = options.progress

        return TrainTask(
            model=model,
            base_model_id=loaded.name,
            task=self.name,
            labels=data.labels,
            train_examples=data.train,
            eval_examples=data.eval,
            collate=collate,
            loss=classification_loss,
            evaluate=lambda m, ex: {"eval_accuracy": evaluate_images(m, ex, collate, progress)},
            train_mode=freeze_batchnorm,
            eval_key=lambda item: str(item[1]),
            metadata={"image_size": size, "image_transform": transform.to_dict()},
        )


def classification_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy of ``model(pixel_values)`` against ``labels``."""
    return F.cross_entropy(model(batch["pixel_values"]), batch["labels"])


def predict_logits(
    model: nn.Module, examples: Sequence[Any], collate: Any, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, C] and labels [N] of ``examples``, in batches of EVAL_BATCH."""
    logits, labels = [], []
    for chunk in eval_chunks(examples, EVAL_BATCH, progress):
        batch = collate(chunk)
        logits.append(model(batch["pixel_values"]).float())
        labels.append(batch["labels"])
    return torch.cat(logits), torch.cat(labels)


def evaluate_images(
    model: nn.Module, examples: Sequence[Any], collate: Any, progress: bool = False
) -> float:
    """Top-1 accuracy on ``examples``."""
    logits, labels = predict_logits(model, examples, collate, progress)
    return accuracy(logits, labels)
