"""DeviceSlotBank: preallocated, zero-padded low-rank factors for every slot of one module."""

from __future__ import annotations

import torch

__all__ = ["DeviceSlotBank"]


class DeviceSlotBank:
    """``A: (max_slots + 1, n_in, R)`` and ``B: (max_slots + 1, R, n_out)`` on the device.

    Slot ``k`` holds the folded update ``(x @ A[k]) @ B[k]`` zero-padded to the bank's
    rank capacity ``R``, so updates of different ranks share one batched matmul exactly
    (the padded columns of ``A`` and rows of ``B`` are zero). The last slot,
    ``null_slot``, stays zero: rows without an adapter index it.

    The capacity starts at the first loaded rank (rounded up to 8) and grows at load
    time, never past ``max_rank``, so a bank for rank-8 adapters does not pay for
    ``max_rank`` (for SmolLM2-135M, 32 slots at R=64 would be about 2 GB of fp32).
    Growing reallocates once, off the hot path.

    ``rank_major=True`` stores ``A`` as ``at: (max_slots + 1, R, n_in)`` (each rank's
    input weights contiguous: what ``flora.serving.backends.numba_cpu`` reads in place);
    ``a`` is then a transposed view with the same logical shape, so every other path reads
    it the same way.
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        max_slots: int,
        max_rank: int,
        device: torch.device,
        dtype: torch.dtype,
        rank_major: bool = False,
    ) -> None:
        self.n_in, self.n_out = n_in, n_out
        self.max_slots, self.max_rank = max_slots, max_rank
        self.device, self.dtype = device, dtype
        self.rank_major = rank_major
        self.a, self.b = self._alloc(0)

    def _alloc(self, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed ``(A, B)`` of capacity ``cap`` (``A`` a transposed view if rank-major)."""
        slots, device, dtype = self.max_slots + 1, self.device, self.dtype
        if self.rank_major:
            a = torch.zeros(slots, cap, self.n_in, device=device, dtype=dtype).transpose(1, 2)
        else:
            a = torch.zeros(slots, self.n_in, cap, device=device, dtype=dtype)
        return a, torch.zeros(slots, cap, self.n_out, device=device, dtype=dtype)

    @property
    def at(self) -> torch.Tensor:
        """``A`` as ``(max_slots + 1, R, n_in)``; contiguous when the bank is rank-major."""
        return self.a.transpose(1, 2)

    @property
    def null_slot(self) -> int:
        return self.max_slots

    @property
    def capacity(self) -> int:
        return int(self.a.shape[2])

    def reserve(self, rank: int) -> None:
        """Make room for a rank-``rank`` update (reallocates if the capacity is smaller)."""
        if rank > self.max_rank:
            raise ValueError(f"rank {rank} exceeds max_rank {self.max_rank}")
        if rank <= self.capacity:
            return
        new_cap = min(self.max_rank, max(rank, -(-rank // 8) * 8, 2 * self.capacity))
        a, b = self._alloc(new_cap)
        a[:, :, : self.capacity] = self.a
        b[:, : self.capacity] = self.b
        self.a, self.b = a, b

    def write(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Copy ``a: (n_in, r)``, ``b: (r, n_out)`` into ``slot`` (zeroing the padding)."""
        r = a.shape[1]
        self.reserve(r)
        self.a[slot, :, :r].copy_(a)
        self.b[slot, :r].copy_(b)
        if r < self.capacity:  # zero only the padding (two ops per module, not four)
            self.a[slot, :, r:].zero_()
            self.b[slot, r:].zero_()

    def clear(self, slot: int) -> None:
        self.a[slot].zero_()
        self.b[slot].zero_()

    def wide(self, slots: list[int], ranks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Side by side: ``A_cat: (n_in, sum r)``, ``B_cat: (sum r, n_out)`` (contiguous)."""
        a = torch.cat([self.a[s, :, :r] for s, r in zip(slots, ranks, strict=True)], dim=1)
        b = torch.cat([self.b[s, :r] for s, r in zip(slots, ranks, strict=True)], dim=0)
        return a.contiguous(), b.contiguous()

    def rows(self, row_index: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: ``A: (B, n_in, rank)``, ``B: (B, rank, n_out)`` (copies, contiguous)."""
        a = self.a[:, :, :rank].index_select(0, row_index).contiguous()
        b = self.b[:, :rank].index_select(0, row_index).contiguous()
        return a, b
