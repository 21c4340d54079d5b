"""The running batch of a Hugging Face causal LM: left-padded KV cache, attention mask and
position ids, with `prefill`, `decode`, `concatenate` and `filter` for continuous batching.

Layout (B rows, T cached positions, left padding):

    attention_mask  [B, T]   1 where the cached position holds a real token of the row
    cache           DynamicCache, per layer keys/values [B, H_kv, T, D]
    next_tokens     [B]      the token each row feeds at the next decode step
    next_positions  [B]      its position id = number of real tokens the row has so far

Why a row's output does not depend on its neighbours: padded key positions are masked out
of attention, and position ids count only real tokens, so the rotary phases of a row are
those it would have alone. Rows therefore differ from a solo run only by floating-point
reduction order inside batched kernels (see tests/unit/server/test_engine_batch.py, which
checks exact greedy tokens in float32).

Full-attention decoder layers only (Llama, Mistral without sliding window, Qwen2, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers import __version__ as transformers_version
from transformers.cache_utils import CacheLayerMixin

# transformers 5.x renamed `past_key_values` to `cache` (the old name warns, then goes away).
# The cache object is updated in place, so the engine keeps its own reference either way.
CACHE_KWARG = "cache" if int(transformers_version.split(".")[0]) >= 5 else "past_key_values"


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists. Returns (input_ids [B, L] int64, attention_mask [B, L] int64)."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, length - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, length - len(prompt) :] = 1
    return ids, mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position id of every column: the count of real tokens before it (0 on padding).
    mask: [B, L] -> [B, L] int64."""
    return (mask.cumsum(dim=-1) - 1).clamp(min=0)


def leading_padding(mask: torch.Tensor) -> int:
    """Number of leading columns that are padding in every row. mask: [B, T]."""
    used = mask.any(dim=0)
    if not bool(used.any()):
        return mask.shape[1]
    return int(used.int().argmax())


@dataclass
class CausalBatch:
    """Tensor state of the running rows; `rows` carries one caller object per row."""

    cache: DynamicCache
    attention_mask: torch.Tensor  # [B, T] int64
    next_tokens: torch.Tensor  # [B] int64
    next_positions: torch.Tensor  # [B] int64
    rows: list[Any]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def kv_length(self) -> int:
        return self.attention_mask.shape[1]

    @classmethod
    @torch.inference_mode()
    def prefill(
        cls,
        model: torch.nn.Module,
        prompts: Sequence[Sequence[int]],
        rows: list[Any],
        *,
        all_logits: bool = False,
    ) -> tuple[CausalBatch, torch.Tensor]:
        """Run the prompts as one left-padded batch. Returns the batch (its `next_tokens`
        still to be set by the caller from the sampled tokens) and the last-position logits
        [B, V] in float32, or with `all_logits` every position's [B, L, V]."""
        device = next(model.parameters()).device
        ids, mask = left_pad(prompts)
        ids, mask = ids.to(device), mask.to(device)
        cache = DynamicCache()
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions_from_mask(mask),
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
            **{CACHE_KWARG: cache},
        )
        batch = cls(
            cache=cache,
            attention_mask=mask,
            next_tokens=torch.zeros(len(rows), dtype=torch.long, device=device),
            next_positions=mask.sum(dim=-1),
            rows=list(rows),
        )
        return batch, out.logits.float() if all_logits else out.logits[:, -1, :].float()

    @torch.inference_mode()
    def decode(self, model: torch.nn.Module) -> torch.Tensor:
        """Feed `next_tokens` to every row; returns logits [B, V] float32."""
        ones = torch.ones_like(self.attention_mask[:, :1])
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        out = model(
            input_ids=self.next_tokens.unsqueeze(1),
            attention_mask=self.attention_mask,
            position_ids=self.next_positions.unsqueeze(1),
            use_cache=True,
            **{CACHE_KWARG: self.cache},
        )
        self.next_positions = self.next_positions + 1
        return out.logits[:, -1, :].float()

    def filter(self, keep: Sequence[int]) -> None:
        """Keep only the rows at indices `keep` (in that order), then drop padding columns
        no remaining row needs."""
        index = torch.tensor(list(keep), dtype=torch.long, device=self.attention_mask.device)
        for layer, keys, values in _filled_layers(self.cache):
            layer.keys = keys.index_select(0, index)
            layer.values = values.index_select(0, index)
        self.attention_mask = self.attention_mask.index_select(0, index)
        self.next_tokens = self.next_tokens.index_select(0, index)
        self.next_positions = self.next_positions.index_select(0, index)
        self.rows = [self.rows[i] for i in keep]
        self.trim()

    def trim(self) -> None:
        """Drop leading columns that are padding in every row."""
        drop = leading_padding(self.attention_mask)
        if drop == 0 or drop == self.kv_length:
            return
        for layer, keys, values in _filled_layers(self.cache):
            layer.keys = keys[:, :, drop:, :]
            layer.values = values[:, :, drop:, :]
        self.attention_mask = self.attention_mask[:, drop:]

    @classmethod
    def concatenate(cls, batches: Sequence[CausalBatch]) -> CausalBatch:
        """Stack batches row-wise, left-padding each one's KV and mask to the longest."""
        batches = [b for b in batches if len(b)]
        if len(batches) == 1:
            return batches[0]
        length = max(b.kv_length for b in batches)
        n_layers = len(batches[0].cache.layers)
        cache = DynamicCache()
        for layer_idx in range(n_layers):
            kvs = [_kv(b.cache.layers[layer_idx]) for b in batches]
            keys = [_pad_kv(k, length) for k, _ in kvs]
            values = [_pad_kv(v, length) for _, v in kvs]
            cache.update(torch.cat(keys, dim=0), torch.cat(values, dim=0), layer_idx)
        mask = torch.cat([F.pad(b.attention_mask, (length - b.kv_length, 0)) for b in batches])
        return cls(
            cache=cache,
            attention_mask=mask,
            next_tokens=torch.cat([b.next_tokens for b in batches]),
            next_positions=torch.cat([b.next_positions for b in batches]),
            rows=[r for b in batches for r in b.rows],
        )


def _filled_layers(
    cache: DynamicCache,
) -> list[tuple[CacheLayerMixin, torch.Tensor, torch.Tensor]]:
    """Each layer of `cache` that holds keys and values, with them ([B, H_kv, T, D] each).
    A layer holding none (nothing cached yet, or no attention) has no rows to select or
    columns to drop."""
    filled = []
    for layer in cache.layers:
        if isinstance(layer, CacheLayerMixin) and layer.keys is not None and layer.keys.numel():
            keys, values = _kv(layer)
            filled.append((layer, keys, values))
    return filled


def _kv(layer: object) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache layer's keys and values, each [B, H_kv, T, D]."""
    if isinstance(layer, CacheLayerMixin) and layer.keys is not None and layer.values is not None:
        return layer.keys, layer.values
    raise TypeError(f"{type(layer).__name__} holds no keys and values to batch")


def _pad_kv(kv: torch.Tensor, length: int) -> torch.Tensor:
    """Left-pad a [B, H, T, D] key or value tensor with zeros to T = length."""
    return F.pad(kv, (0, 0, length - kv.shape[2], 0))
