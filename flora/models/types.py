"""What :func:`flora.models.load` returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from torch import nn

ModelKind = Literal["causal-lm", "text-encoder", "image-classifier", "text-classifier"]
MODEL_KINDS: tuple[str, ...] = get_args(ModelKind)


def a_kind(kind: str) -> str:
    """The kind with its indefinite article, for messages: "an image-classifier"."""
    return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind}"


# Text-encoder pooling modes (sentence-transformers names them the same way).
PoolingMode = Literal["mean", "cls"]


@dataclass(frozen=True)
class Pooling:
    """How a text encoder turns token states into one vector per text.

    ``mean``: e = sum_t m_t h_t / max(sum_t m_t, eps) over the attention mask m;
    ``cls``: e = h_0. With ``normalize`` the result is divided by its L2 norm.
    """

    mode: PoolingMode = "mean"
    normalize: bool = True


@dataclass
class LoadedModel:
    """A base model ready for inference or adapter training.

    Attributes:
        name: registry name (``smollm2-135m-instruct``) or the resolved directory path.
        kind: task kind; decides which server routes exist.
        model: the ``nn.Module`` in eval mode, on the requested device and dtype.
        preprocessor: a tokenizer for text kinds, an ``ImageTransform`` for images.
        fingerprint: ``base_fingerprint`` of the canonical fp32 weights (independent of the
            runtime device/dtype); adapters carry it to prove which base they were made for.
        labels: class names for classifiers (ImageNet-1k for efficientnet-lite0), else None.
        context_length: maximum sequence length for text kinds, else None.
        source_path: the safetensors weights the model was loaded from (the server restores
            exact base weights from it).
        pooling: for text encoders, how :func:`flora.models.encode` pools; else None.
        config: small extra facts (image size, hidden size, ...), JSON-able.
    """

    name: str
    kind: ModelKind
    model: nn.Module
    preprocessor: Any
    fingerprint: str
    labels: list[str] | None = None
    context_length: int | None = None
    source_path: Path | None = None
    pooling: Pooling | None = None
    config: dict[str, Any] | None = None
