"""Runs one packed step of a Hugging Face causal LM over the paged KV pool.

Packing: the step's chunks (decode tokens and prefill chunks of several sequences) are laid
out one after the other as one row of T tokens, `input_ids [1, T]`, `position_ids [1, T]`.
Every layer of the model other than attention acts on each token alone, and a chunk's
tokens use one adapter, so the adapters are routed per segment (`flora.serving.Segments`,
`packed_segments`: a chunk is one segment, a decode token a segment of one): each served
projection applies a chunk's adapter to its tokens at once (SGMV), and a step whose tokens
all use one slot (or the base) takes the serving layers' one-row GEMM path. Attention is
the one place where tokens meet, and it is replaced here:

- `PagedStep.update` (called by each attention layer as its cache) writes the new keys and
  values of the T tokens into their slots of the pool (`slot = block * block_size + offset`);
- `paged_attention` (registered with transformers' `AttentionInterface` as "flora_paged")
  gathers each sequence's keys and values from the pool by its block table and runs
  `scaled_dot_product_attention`: the step's decode tokens together, as one batch padded to
  the longest context with a key mask; each prefill chunk alone, with `is_causal` when it
  starts at position 0, else an explicit causal mask offset by the positions already cached
  (docs/engine.md has the measurements behind this split). A recorded CUDA graph
  (`graphs.py`) runs every token as a decode row ([T, 1]), and their attention is one
  Triton kernel, reading each row's keys through its slots (`fused.py`). Registering an
  attention function without a mask function makes transformers skip building its own
  mask (`masking_utils._preprocess_mask_arguments`).
- A sliding-window layer (its window from `windows.attention_windows`, the rule of what
  engine v2 serves) adds transformers' window to both paths: a query at position q sees
  keys at k with q - window < k <= q, and keys before every query's window are not read.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from flora.serving.segments import Segments
from flora_server.engine.paged.fused import FusedKernels
from flora_server.engine.paged.fused_install import o_delta_for
from flora_server.engine.paged.windows import attention_windows

ATTENTION_NAME = "flora_paged"

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class ChunkInput:
    """What the runner needs of one scheduled chunk."""

    token_ids: Sequence[int]  # the chunk's tokens
    start: int  # position of its first token
    blocks: Sequence[int]  # the sequence's block table (covers start + len(token_ids))


class KVTensors:
    """The KV pool's storage, allocated once: per layer, keys and values of shape
    [num_blocks * block_size + 1, kv_heads, head_dim] (the last slot is the zero pad)."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        # One slot past the blocks stays zero: padding reads it, so a non-finite value in
        # one sequence's keys (an adapter that overflows) never reaches another's output.
        self.pad_slot = num_blocks * block_size
        shape = (self.pad_slot + 1, kv_heads, head_dim)
        self.block_size = block_size
        self.keys = [_zeros(shape, dtype, device) for _ in range(num_layers)]
        self.values = [_zeros(shape, dtype, device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_token(config: Any, dtype: torch.dtype) -> int:
        """Key + value bytes one token position costs over all layers."""
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_hidden_layers * kv_heads * head_dim * itemsize

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.keys, *self.values])


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A zero tensor. On the CPU its memory comes from calloc (numpy), whose large blocks the
    kernel maps zero-filled on first touch: the pages of KV blocks never used are not
    resident, so a server holds what its pool has used, not `kv_cache_bytes` at start. The
    pool stays all zeros where unwritten (the decode graphs read whole blocks, masked)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    import numpy as np

    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


@dataclass(frozen=True)
class _Keys:
    """What one group of queries reads under one window: pool slots and the mask."""

    read: torch.Tensor  # prefill chunk: [L] slots; decode batch: [B, L]
    mask: torch.Tensor | None  # prefill: [n, L] bool; decode: [B, 1, 1, L] bool
    is_causal: bool = False  # a prefill chunk at position 0 that needs no explicit mask
    # decode: [B] int32, how many of a row's `read` columns it sees (the mask is always a
    # prefix of the columns); what the fused kernel reads in place of the mask
    lengths: torch.Tensor | None = None


class PagedStep:
    """One forward's view of the pool: the cache object the attention layers update, and
    the per-sequence gather indices `paged_attention` reads. `windows[layer]` is that
    layer's sliding window (None: full attention; `windows.attention_windows`)."""

    def __init__(
        self,
        kv: KVTensors,
        chunks: Sequence[ChunkInput],
        device: torch.device,
        tokens_as_rows: bool = True,
        windows: Sequence[int | None] = (),
    ) -> None:
        bs = kv.block_size
        self.kv = kv
        # attention and the pool writes in one kernel each (a recorded graph's step,
        # `decode_only`), else SDPA and `index_copy_`
        self.fused: FusedKernels | None = None
        # Layout of the forward: [T, 1] (a row per token) or [1, T] (one row).
        self.tokens_as_rows = tokens_as_rows
        self.windows = tuple(windows)
        kinds = {None, *self.windows}
        write: list[int] = []
        # (first packed row, rows, the keys of each window kind)
        self.prefills: list[tuple[int, int, dict[int | None, _Keys]]] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []  # the blocks each decode row reads
        decode_lengths: list[int] = []
        row = 0
        for chunk in chunks:
            n, start = len(chunk.token_ids), chunk.start
            end = start + n
            if n == 1:  # decode tokens go together in one padded SDPA call
                write.append(chunk.blocks[start // bs] * bs + start % bs)
                decode_rows.append(row)
                decode_tables.append(list(chunk.blocks[: start // bs + 1]))
                decode_lengths.append(end)
            else:
                slots = [chunk.blocks[p // bs] * bs + p % bs for p in range(end)]
                write.extend(slots[start:])
                read = torch.tensor(slots, dtype=torch.long, device=device)
                keys = {w: _chunk_keys(read, n, start, w) for w in kinds}
                self.prefills.append((row, n, keys))
            row += n
        self.write: torch.Tensor | None = torch.tensor(write, dtype=torch.long, device=device)
        # Decode group: keys gathered into [B, L_max] (padding reads the zero pad slot,
        # masked out), from the block tables by tensor arithmetic (a row's slots one by
        # one in Python cost more than the forward at 128 rows).
        self.decode_rows: torch.Tensor | None = None
        self.decode: dict[int | None, _Keys] = {}
        if decode_rows:
            width = max(len(t) for t in decode_tables)
            tables = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables])
            lengths = torch.tensor(decode_lengths).unsqueeze(1)  # [B, 1]
            offsets = torch.arange(max(decode_lengths))  # [L]
            mask = offsets < lengths  # [B, L]
            gather = (tables[:, offsets // bs] * bs + offsets % bs).masked_fill(~mask, kv.pad_slot)
            mask = mask.view(len(decode_rows), 1, 1, -1)
            self.decode_rows = torch.tensor(decode_rows, dtype=torch.long, device=device)
            self.set_decode(gather.to(device), mask.to(device), (lengths - 1).to(device))

    @classmethod
    def decode_only(
        cls,
        kv: KVTensors,
        rows: int,
        device: torch.device,
        windows: Sequence[int | None] = (),
        fused: FusedKernels | None = None,
    ) -> PagedStep:
        """A step of B = `rows` tokens, each its own decode row (layout [B, 1]), whose
        index tensors are computed by the forward that reads them, as a CUDA graph
        replays it: before each forward, `write` (each row's pool slot) and `set_decode`."""
        step = cls(kv, [], device, windows=windows)
        step.fused = fused
        step.decode_rows = torch.arange(rows, device=device)
        return step

    def set_decode(self, gather: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> None:
        """The decode batch's keys per window kind. gather [B, L]: slots of each row's
        positions 0..L-1; mask [B, 1, 1, L] bool; positions [B, 1]: each row's query
        position. Tensor work only, so a graph records it with the forward that reads it."""
        lengths = (positions.view(-1) + 1).to(torch.int32)
        self.decode = {None: _Keys(gather, mask, lengths=lengths)}
        for w in {w for w in self.windows if w is not None}:
            self.decode[w] = _window_keys(gather, mask, positions, w, self.kv.pad_slot)

    def release(self) -> None:
        """Drop the index tensors the forward computed (`write`, the decode keys). In a
        CUDA graph they are intermediates of the recording: once nothing holds them, the
        graphs' shared pool hands their memory to the next recording, as it does the
        activations'."""
        self.write = None
        self.decode = {}

    # Older transformers ask the cache for its length when building positions; the runner
    # always passes positions, so any value serves.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[T, H, 1, D] or [1, H, T, D] (by layout) -> [T, H, D]."""
        return x.squeeze(2) if self.tokens_as_rows else x[0].transpose(0, 1)

    # transformers calls `cache.update(k, v, layer_idx, kwargs=...)`; k, v: [B, H_kv, L, D].
    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.kv.keys[layer_idx], self.kv.values[layer_idx]
        assert self.write is not None, "a decode_only step's forward sets `write` first"
        if self.fused is not None:  # a recorded step: both in one kernel
            self.fused.write_kv(keys, values, self.write, self._tokens(key), self._tokens(value))
            return key, value
        keys.index_copy_(0, self.write, self._tokens(key).to(keys.dtype))
        values.index_copy_(0, self.write, self._tokens(value).to(values.dtype))
        return key, value

    def attend(
        self,
        layer_idx: int,
        query: torch.Tensor,
        scaling: float | None,
        module: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """query: [T, H, 1, D] or [1, H, T, D] -> attention output [T, 1, H, D] or
        [1, T, H, D] (what transformers reshapes back to the hidden states). ``module``:
        the attention module, whose output projection's adapter delta the fused decode
        kernel computes too where it can (``fused_install.o_delta_for``)."""
        keys, values = self.kv.keys[layer_idx], self.kv.values[layer_idx]
        window = self.windows[layer_idx] if self.windows else None
        q = self._tokens(query)  # [T, H, D]
        if self.fused is not None and q.stride(-1) != 1:
            q = q.contiguous()
        out = torch.empty_like(q)
        gqa = q.shape[1] != keys.shape[1]
        if self.decode_rows is not None and self.fused is not None:
            view = self.decode[window]
            assert view.lengths is not None
            scale = scaling if scaling is not None else q.shape[-1] ** -0.5
            splits = self.fused.splits_for(view.read, keys)
            o_delta = None
            every_token = not self.prefills and self.decode_rows.shape[0] == q.shape[0]
            if splits == 1 and module is not None and every_token:  # o's delta: every row
                o_delta = o_delta_for(self.fused, module, out)
            self.fused.decode_attention(
                q, keys, values, view.read, view.lengths, self.decode_rows, out, scale, splits,
                o_delta,
            )  # fmt: skip
        elif self.decode_rows is not None:
            view = self.decode[window]
            k = keys[view.read].transpose(1, 2)  # [B, H_kv, L, D]
            v = values[view.read].transpose(1, 2)
            qd = q.index_select(0, self.decode_rows).unsqueeze(2)  # [B, H, 1, D]
            od = F.scaled_dot_product_attention(
                qd,
                k.to(q.dtype),
                v.to(q.dtype),
                attn_mask=view.mask,
                scale=scaling,
                enable_gqa=gqa,
            )
            out.index_copy_(0, self.decode_rows, od.squeeze(2))
        for row, n, chunk_keys in self.prefills:
            view = chunk_keys[window]
            k = keys.index_select(0, view.read).transpose(0, 1).unsqueeze(0)  # [1, H_kv, L, D]
            v = values.index_select(0, view.read).transpose(0, 1).unsqueeze(0)
            qi = q[row : row + n].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
            oi = F.scaled_dot_product_attention(
                qi,
                k.to(q.dtype),
                v.to(q.dtype),
                attn_mask=view.mask,
                is_causal=view.is_causal,
                scale=scaling,
                enable_gqa=gqa,
            )
            out[row : row + n] = oi[0].transpose(0, 1)
        return out.unsqueeze(1) if self.tokens_as_rows else out.unsqueeze(0)


def _chunk_keys(read: torch.Tensor, n: int, start: int, window: int | None) -> _Keys:
    """The keys of a prefill chunk of n > 1 queries at positions start..start+n-1 under
    `window` (None: full attention). `read` [start + n]: the slots of positions 0.. .

    The rule is transformers' (`masking_utils.sliding_window_causal_mask_function`): query
    position q sees key position k iff k <= q and k > q - window. Keys before the first
    query's window are not read at all; a chunk at position 0 that no window cuts takes
    SDPA's `is_causal` instead of a mask."""
    first = 0 if window is None else max(0, start - window + 1)
    if start == 0 and (window is None or n <= window):
        return _Keys(read, None, is_causal=True)
    q = torch.arange(start, start + n, device=read.device).unsqueeze(1)  # [n, 1]
    k = torch.arange(first, start + n, device=read.device).unsqueeze(0)  # [1, L]
    mask = k <= q
    if window is not None:
        mask &= k > q - window
    return _Keys(read[first:], mask)


def _window_keys(
    gather: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, window: int, pad: int
) -> _Keys:
    """The decode batch's keys under a sliding window (the rule of `_chunk_keys`): each row
    reads only its last `window` positions, [B, min(L, window)], instead of all L.
    gather [B, L]: slots of positions 0..L-1; mask [B, 1, 1, L]; positions [B, 1]: each
    row's query position. Pure tensor work, so a CUDA graph records it."""
    batch, span = gather.shape
    if span <= window:  # every key a row may see is within its window
        return _Keys(gather, mask, lengths=(positions.view(-1) + 1).to(torch.int32))
    first = (positions - window + 1).clamp(min=0)  # [B, 1]
    cols = first + torch.arange(window, device=gather.device)  # [B, W] key positions
    valid = cols <= positions
    read = gather.gather(1, cols.clamp(max=span - 1)).masked_fill(~valid, pad)
    lengths = (positions.view(-1) - first.view(-1) + 1).to(torch.int32)
    return _Keys(read, valid.view(batch, 1, 1, window), lengths=lengths)


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: the paged path when the forward carries a
    `flora_paged` step, else plain SDPA (a forward that did not come from the runner)."""
    step = kwargs.pop("flora_paged", None)
    if step is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    return step.attend(module.layer_idx, query, scaling, module), None


def install_paged_attention(model: PreTrainedModel) -> None:
    """Register `paged_attention` with transformers and select it for `model`."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention)
    model.config._attn_implementation = ATTENTION_NAME


def cache_kwarg_of(decoder: torch.nn.Module) -> str:
    """The name the decoder's forward takes its cache by: `cache` in newer transformers,
    `past_key_values` before (read from the signature, not from the version)."""
    params = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def packed_segments(chunks: Sequence[ChunkInput], token_slots: Sequence[int | None]) -> Segments:
    """The adapter routing of a packed step: each chunk (a prefill chunk, or a decode
    token) is one segment with its tokens' slot (None: base)."""
    lengths = [len(c.token_ids) for c in chunks]
    slots, first = [], 0
    for n in lengths:
        chunk_slots = set(token_slots[first : first + n])
        if len(chunk_slots) != 1:
            raise ValueError(f"the tokens of one chunk use slots {chunk_slots}, not one")
        slots.append(chunk_slots.pop())
        first += n
    if first != len(token_slots):
        raise ValueError(f"{len(token_slots)} token slots for {first} packed tokens")
    return Segments.from_lengths(lengths, slots)


class PagedRunner:
    """Runs a packed step: the decoder over all the step's tokens, then the LM head on the
    rows whose logits are sampled. `route(routing)` sets the adapter routing
    (`ServingModel.set_routing`: the step's `Segments`, then the sampled rows' slots)."""

    def __init__(self, model: PreTrainedModel, kv: KVTensors) -> None:
        self.windows = attention_windows(model)
        install_paged_attention(model)
        self.model = model
        self.kv = kv
        self.device = next(model.parameters()).device
        self._decoder = model.get_decoder()
        self._head = model.get_output_embeddings()
        self._cache_kwarg = cache_kwarg_of(self._decoder)

    @torch.inference_mode()
    def run(
        self,
        chunks: Sequence[ChunkInput],
        token_slots: Sequence[int | None],
        sample_rows: Sequence[int],
        route: Any,
    ) -> torch.Tensor:
        """Forward the chunks (packed in order, one row of T tokens); returns float32
        logits [S, V] of the packed tokens `sample_rows`. `token_slots`: the adapter slot of
        every packed token (one per chunk, repeated over its tokens); `route` takes the
        step's `Segments`, then the sampled rows' slots for the LM head."""
        step = PagedStep(self.kv, chunks, self.device, tokens_as_rows=False, windows=self.windows)
        ids = [t for c in chunks for t in c.token_ids]
        pos = [c.start + i for c in chunks for i in range(len(c.token_ids))]
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device).unsqueeze(0)
        positions = torch.tensor(pos, dtype=torch.long, device=self.device).unsqueeze(0)
        route(packed_segments(chunks, token_slots))
        out = self._decoder(
            input_ids=input_ids,
            position_ids=positions,
            use_cache=True,
            flora_paged=step,
            **{self._cache_kwarg: step},
        )
        rows = torch.tensor(list(sample_rows), dtype=torch.long, device=self.device)
        hidden = out.last_hidden_state.reshape(len(ids), 1, -1).index_select(0, rows)
        route([token_slots[i] for i in sample_rows])
        return self._head(hidden)[:, -1, :].float()
