"""Recipe ``text-classification``: FLoRA on a text encoder plus a new linear head.

logits = W e + b, with e the encoder's sentence embedding (the base's pooling: masked mean
and L2 normalisation for MiniLM, exactly what ``/v1/embeddings`` returns). The head is
added to the bare encoder as submodule ``classifier`` and saved whole with the adapter
(``train_modules``); to use the adapter on a fresh base, attach the same placeholder
first (:func:`attach_text_head`), then ``flora.apply_adapter`` puts the trained head in.

The head is trained first: a softmax regression on the frozen base's embeddings (the
linear probe) initialises it, then head and adapters train together. ``extra_metrics``
reports that probe's accuracy, ``linear_probe_eval_accuracy``, on the same eval examples:
the baseline the adapter has to beat.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flora.config import FloraConfig
from flora.injection import inject, set_enabled
from flora.models.text_encoder import pool
from flora.models.types import LoadedModel, Pooling, a_kind
from flora.train.batches import eval_chunks, on_device
from flora.train.data import load_text_labels
from flora.train.errors import TrainError
from flora.train.heads import HEAD_NAME, accuracy, adaptable_names, attach_head
from flora.train.options import RecipeDefaults, TrainOptions
from flora.train.recipe import Batch, TrainTask
from flora.train.sources import labelled_data

AUTO = "auto"  # every Linear of the encoder except the head and the (unused) pooler
EVAL_BATCH = 64
PROBE_STEPS = 300
PROBE_LR = 0.05


def attach_text_head(model: nn.Module, num_labels: int) -> nn.Linear:
    """Add the placeholder head ``classifier`` (hidden -> num_labels) to a bare encoder."""
    hidden = int(getattr(model, "config").hidden_size)  # noqa: B009 (a transformers model)
    return attach_head(model, hidden, num_labels)


def text_max_length(asked: int, loaded: LoadedModel) -> int:
    """``--max-length`` capped at the base's context; TrainError when the tokenizer's
    special tokens ([CLS], [SEP]) would leave no room for a text token (a fast tokenizer
    then does not truncate at all)."""
    max_length = min(asked, loaded.context_length or asked)
    special = int(loaded.preprocessor.num_special_tokens_to_add(pair=False))
    if max_length <= special:
        raise TrainError(
            f"--max-length must be > {special} for {loaded.name}: its tokenizer adds "
            f"{special} special tokens to every text, got {asked}"
        )
    return max_length


def sentence_logits(model: nn.Module, batch: Batch, pooling: Pooling) -> torch.Tensor:
    """[B, num_labels] = classifier(pool(encoder(input_ids, attention_mask)))."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    emb = pool(out.last_hidden_state, batch["attention_mask"], pooling)  # [B, D]
    return model.get_submodule(HEAD_NAME)(emb)


class TextClassificationRecipe:
    """A new head + FLoRA linear adapters on a text encoder."""

    name = "text-classification"
    description = "CSV/JSONL text,label / builtin:chatterbot-topics -> new head + adapters"
    # The new head trains whole (`train_modules`): --targets naming it and --export peft
    # are refused before the base loads (`TrainOptions.resolved`).
    defaults = RecipeDefaults(
        targets=AUTO, lr=2e-3, batch_size=16, epochs=3.0, scale=1.0, train_modules=(HEAD_NAME,)
    )

    def prepare(self, options: TrainOptions, loaded: LoadedModel) -> TrainTask:
        if loaded.kind != "text-encoder" or loaded.pooling is None:
            raise TrainError(
                f"{loaded.name} is {a_kind(loaded.kind)}; text-classification needs a text encoder"
            )
        model, tokenizer, pooling = loaded.model, loaded.preprocessor, loaded.pooling
        max_length = text_max_length(options.max_length, loaded)
        data = labelled_data(options, "text", load_text_labels)
        attach_text_head(model, len(data.labels))

        def collate_cpu(examples: list[tuple[Any, int]]) -> Batch:
            enc = tokenizer(
                [t for t, _ in examples],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            return {
                "input_ids": enc["input_ids"],  # [B, T]
                "attention_mask": enc["attention_mask"],  # [B, T]
                "labels": torch.tensor([y for _, y in examples]),  # [B]
            }

        collate = on_device(collate_cpu, torch.device(options.device))
        # Train the head first: a softmax regression on the frozen base's embeddings
        # (the linear probe) becomes the head's starting point, so the adapter starts
        # where the probe ends and the joint training only has to improve on it.
        probe_head = fit_probe(
            model, data.train, collate, pooling, len(data.labels), options.seed, options.progress
        )
        with torch.no_grad():
            head = model.get_submodule(HEAD_NAME)
            assert isinstance(head, nn.Linear)  # attach_text_head put it there
            head.weight.copy_(probe_head.weight)
            head.bias.copy_(probe_head.bias)
        targets = options.targets
        if targets == AUTO:
            targets = [
                n for n in adaptable_names(model, (nn.Linear,), HEAD_NAME) if "pooler" not in n
            ]
        assert targets is not None and options.scale is not None  # resolved options
        # FloraConfig's own rules were checked per flag in TrainOptions; what is left for
        # inject to refuse is the targets (nothing matches, an unsupported module).
        config = FloraConfig(
            target_modules=targets,
            rank=options.rank,
            scale=options.scale,
            train_modules=[HEAD_NAME],
        )
        try:
            inject(model, config)
        except ValueError as exc:
            raise TrainError(f"--targets: {exc}") from None
        progress = options.progress

        def loss(m: nn.Module, batch: Batch) -> torch.Tensor:
            return F.cross_entropy(sentence_logits(m, batch, pooling), batch["labels"])

        def evaluate(m: nn.Module, examples: Sequence[Any]) -> dict[str, float]:
            logits, labels = _predict(m, examples, collate, pooling, progress)
            return {"eval_accuracy": accuracy(logits, labels)}

        def probe(eval_examples: Sequence[Any]) -> dict[str, float]:
            return {
                "linear_probe_eval_accuracy": probe_accuracy(
                    model, probe_head, eval_examples, collate, pooling
                )
            }

        return TrainTask(
            model=model,
            base_model_id=loaded.name,
            task=self.name,
            labels=data.labels,
            train_examples=data.train,
            eval_examples=data.eval,
            collate=collate,
            loss=loss,
            evaluate=evaluate,
            train_mode=lambda m: m.train(),
            metadata={
                "pooling": {"mode": pooling.mode, "normalize": pooling.normalize},
                "head": HEAD_NAME,
            },
            extra_metrics=probe,
            eval_key=lambda item: str(item[1]),
            # No larger step for the head: it starts from the probe's solution (a randomly
            # initialised head on unit-norm embeddings needed 25x the adapters' rate, and
            # that step pushed a fitted head away from the probe's accuracy).
        )


def _predict(
    model: nn.Module, examples: Sequence[Any], collate: Any, pooling: Pooling, progress: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    logits, labels = [], []
    for chunk in eval_chunks(examples, EVAL_BATCH, progress):
        batch = collate(chunk)
        logits.append(sentence_logits(model, batch, pooling).float())
        labels.append(batch["labels"])
    return torch.cat(logits), torch.cat(labels)


@torch.no_grad()
def _embeddings(
    model: nn.Module, examples: Sequence[Any], collate: Any, pooling: Pooling, progress: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    embs, labels = [], []
    for chunk in eval_chunks(examples, EVAL_BATCH, progress, "embed"):
        batch = collate(chunk)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        embs.append(pool(out.last_hidden_state, batch["attention_mask"], pooling).float())
        labels.append(batch["labels"])
    return torch.cat(embs), torch.cat(labels)


def fit_probe(
    model: nn.Module,
    train: Sequence[Any],
    collate: Any,
    pooling: Pooling,
    num_labels: int,
    seed: int,
    progress: bool = False,
) -> nn.Linear:
    """The linear probe: softmax regression on frozen base embeddings.

    Embeddings come from the model with its adapters switched off (the base); the head
    minimises mean cross-entropy by full-batch Adam for PROBE_STEPS steps."""
    x_train, y_train = _base_embeddings(model, train, collate, pooling, progress)
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(x_train.shape[1], num_labels, device=x_train.device)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.01)
        head.bias.zero_()
    opt = torch.optim.Adam(head.parameters(), lr=PROBE_LR)
    with torch.enable_grad(), torch.autocast(x_train.device.type, enabled=False):
        for _ in range(PROBE_STEPS):
            opt.zero_grad()
            F.cross_entropy(head(x_train), y_train).backward()
            opt.step()
    return head.requires_grad_(False)


def probe_accuracy(
    model: nn.Module, head: nn.Linear, eval_: Sequence[Any], collate: Any, pooling: Pooling
) -> float:
    """Accuracy of the probe ``head`` on the base's embeddings of ``eval_``."""
    x_eval, y_eval = _base_embeddings(model, eval_, collate, pooling)
    with torch.no_grad(), torch.autocast(x_eval.device.type, enabled=False):
        return accuracy(head(x_eval), y_eval)


def _base_embeddings(
    model: nn.Module,
    examples: Sequence[Any],
    collate: Any,
    pooling: Pooling,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    was_training = model.training
    model.eval()
    set_enabled(model, False)
    try:
        return _embeddings(model, examples, collate, pooling, progress)
    finally:
        set_enabled(model, True)
        model.train(was_training)
