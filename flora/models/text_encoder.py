"""Sentence embeddings from a bare encoder: masked mean (or CLS) pooling, L2 normalisation.

This is the maths of sentence-transformers' Pooling + Normalize modules for
all-MiniLM-L6-v2. ``LoadedModel.model`` stays the bare HF encoder (module names identical
to Hugging Face/PEFT, so adapters address the same names); pooling is applied outside it,
by :func:`pool` on token states the server may batch itself, or by :func:`encode` end to end.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flora.models.types import LoadedModel, Pooling, a_kind

_EPS = 1e-9  # sentence-transformers clamps the token count at 1e-9
_NORM_EPS = 1e-12  # torch.nn.functional.normalize's default


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """e_i = sum_t m_it h_it / max(sum_t m_it, eps).

    hidden: [B, T, D]; attention_mask: [B, T] (1 = token, 0 = padding) -> [B, D].
    Accumulates in fp32 even for half-precision states (sums over hundreds of tokens).
    """
    mask = attention_mask.to(torch.float32).unsqueeze(-1)  # [B, T, 1]
    summed = (hidden.to(torch.float32) * mask).sum(dim=1)  # [B, D]
    counts = mask.sum(dim=1).clamp(min=_EPS)  # [B, 1]
    return summed / counts


def pool(hidden: Tensor, attention_mask: Tensor, pooling: Pooling) -> Tensor:
    """Pool token states [B, T, D] to [B, D] in fp32, then L2-normalise if asked."""
    if pooling.mode == "mean":
        out = mean_pool(hidden, attention_mask)
    else:
        out = hidden[:, 0].to(torch.float32)
    if pooling.normalize:
        out = torch.nn.functional.normalize(out, p=2.0, dim=-1, eps=_NORM_EPS)
    return out


def embed(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, pooling: Pooling) -> Tensor:
    """Forward the encoder and pool: input_ids, attention_mask: [B, T] -> [B, D] fp32."""
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    return pool(out.last_hidden_state, attention_mask, pooling)


@torch.inference_mode()
def encode(loaded: LoadedModel, texts: Sequence[str], *, batch_size: int = 32) -> Tensor:
    """Embed ``texts`` with a loaded text encoder: tokenize (truncated to the model's
    context length), forward, pool, normalise. Returns fp32 [n, dim] on the model's device.
    """
    if loaded.kind != "text-encoder" or loaded.pooling is None:
        raise ValueError(f"{loaded.name} is {a_kind(loaded.kind)}, not a text encoder")
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    device = next(loaded.model.parameters()).device
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = loaded.preprocessor(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=loaded.context_length,
            return_tensors="pt",
        ).to(device)
        chunks.append(
            embed(loaded.model, batch["input_ids"], batch["attention_mask"], loaded.pooling)
        )
    if not chunks:
        hidden = getattr(getattr(loaded.model, "config", None), "hidden_size", 0)
        return torch.empty(0, hidden, device=device)
    return torch.cat(chunks)
