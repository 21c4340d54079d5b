"""``Segments``: the routing of a packed forward, as contiguous token ranges.

A packed step (engine v2) lays the tokens of several requests one after the other: a
request's decode token or prefill chunk is a contiguous range that uses one adapter. The
served modules apply each range's adapter to the range at once (SGMV, as in Punica and
S-LoRA): one shrink and one expand per segment, with the segment's factors read once,
instead of a per-token gather. ``segment_delta`` is the definition the kernels are tested
against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["NO_SLOT", "Segments", "segment_delta", "slot_groups"]

NO_SLOT = -1
"""Row (or segment) slot meaning "base model only"."""


@dataclass(frozen=True)
class Segments:
    """Token ranges ``[starts[i], starts[i] + lengths[i])`` that tile the flattened tokens
    of one forward in order, each with its adapter slot (``NO_SLOT`` = base only).

    Valid by construction (checked here, once): the three tuples have one entry per
    segment, there is at least one segment, lengths are >= 0 (empty segments are allowed
    and cost nothing), each segment starts where the previous one ends (the first at 0),
    and slots are ints >= ``NO_SLOT``. Whether a slot is loaded is the model's check
    (``ServingModel.set_routing``).
    """

    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    slots: tuple[int, ...]

    def __post_init__(self) -> None:
        n = len(self.starts)
        if n == 0:
            raise ValueError("segments: at least one segment is needed")
        if len(self.lengths) != n or len(self.slots) != n:
            raise ValueError(
                f"segments: {n} starts, {len(self.lengths)} lengths and {len(self.slots)} "
                "slots; one of each per segment"
            )
        expected = 0
        for i, (start, length, slot) in enumerate(
            zip(self.starts, self.lengths, self.slots, strict=True)
        ):
            for what, v in (("start", start), ("length", length), ("slot", slot)):
                if not isinstance(v, int) or isinstance(v, bool):
                    raise TypeError(f"segments: {what} of segment {i} is {v!r}, not an int")
            if length < 0:
                raise ValueError(f"segments: segment {i} has length {length} (< 0)")
            if start != expected:
                raise ValueError(
                    f"segments: segment {i} starts at {start}, expected {expected} "
                    "(segments tile the tokens in order, without gaps or overlaps)"
                )
            if slot < NO_SLOT:
                raise ValueError(f"segments: slot {slot} of segment {i} (use {NO_SLOT} for base)")
            expected += length

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], slots: Sequence[int | None]) -> Segments:
        """Consecutive segments of ``lengths`` tokens (``None`` slots: base only)."""
        starts, total = [], 0
        for n in lengths:
            starts.append(total)
            total += int(n)
        return cls(
            tuple(starts),
            tuple(int(n) for n in lengths),
            tuple(NO_SLOT if s is None else int(s) for s in slots),
        )

    @property
    def total(self) -> int:
        """Number of tokens the segments cover (the forward's flattened token count)."""
        return self.starts[-1] + self.lengths[-1]

    def token_slots(self) -> list[int]:
        """Each token's slot: the per-row routing of the same forward laid out ``[T, 1]``."""
        return [s for s, n in zip(self.slots, self.lengths, strict=True) for _ in range(n)]

    def with_slots(self, slots: Sequence[int]) -> Segments:
        """The same ranges with other slots (a module masks slots that do not target it)."""
        return Segments(self.starts, self.lengths, tuple(slots))

    def live_slots(self) -> list[int]:
        """The distinct slots of the non-empty segments, base excluded, in first-use order."""
        seen = dict.fromkeys(
            s for s, n in zip(self.slots, self.lengths, strict=True) if n > 0 and s != NO_SLOT
        )
        return list(seen)

    def uniform_slot(self) -> int | None:
        """The slot every token uses when there is one (``NO_SLOT`` included), else None."""
        used = {s for s, n in zip(self.slots, self.lengths, strict=True) if n > 0}
        return next(iter(used)) if len(used) == 1 else None

    def pieces(self, max_tokens: int) -> list[tuple[int, int, int]]:
        """``(first token, end token, slot)`` of every non-empty segment cut into pieces of
        at most ``max_tokens`` tokens: the units of work a kernel spreads over threads or
        programs."""
        out = []
        for start, length, slot in zip(self.starts, self.lengths, self.slots, strict=True):
            for lo in range(start, start + length, max_tokens):
                out.append((lo, min(lo + max_tokens, start + length), slot))
        return out


def slot_groups(segments: Segments, device: torch.device) -> list[tuple[int, slice | torch.Tensor]]:
    """Per distinct slot (base excluded), the tokens of every segment that uses it: a
    ``slice`` when that is one segment, else a long index tensor on ``device``. Same-slot
    segments then share one matmul pair, and each adapter's factors are read once."""
    groups: list[tuple[int, slice | torch.Tensor]] = []
    for s in segments.live_slots():
        spans = [
            (start, start + n)
            for start, n, slot in zip(
                segments.starts, segments.lengths, segments.slots, strict=True
            )
            if slot == s and n > 0
        ]
        if len(spans) == 1:
            groups.append((s, slice(*spans[0])))
        else:
            index = [t for lo, hi in spans for t in range(lo, hi)]
            groups.append((s, torch.tensor(index, dtype=torch.long, device=device)))
    return groups


def segment_delta(
    x: torch.Tensor, segments: Segments, a: torch.Tensor, b: torch.Tensor, ranks: Sequence[int]
) -> torch.Tensor:
    """The definition: ``d[seg] = (x[seg] @ A_s[:, :r]) @ B_s[:r]`` for every segment of slot
    ``s`` and rank ``r = ranks[s]`` (zeros for base segments and rank 0), one matmul pair per
    segment, in float64.

    ``x: [N, in]``, ``a: [S, in, R]``, ``b: [S, R, out]`` (a ``DeviceSlotBank``'s tensors);
    returns ``[N, out]`` float64.
    """
    out = torch.zeros(x.shape[0], b.shape[2], dtype=torch.float64, device=x.device)
    for start, length, s in zip(segments.starts, segments.lengths, segments.slots, strict=True):
        if s == NO_SLOT or length == 0 or ranks[s] == 0:
            continue
        r, span = ranks[s], slice(start, start + length)
        out[span] = x[span].double() @ a[s, :, :r].double() @ b[s, :r].double()
    return out
