"""Where and in what precision a run trains: ``--device`` and ``--precision``.

The model's weights and the adapter's parameters stay float32 on the chosen device; bf16
and fp16 apply through autocast (matmuls and convs run in the low precision, the
optimizer updates float32 masters), so a saved adapter is float32 whatever the precision.
fp16 needs a gradient scaler against underflow; bf16 has float32's range and does not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from flora.train.errors import TrainError

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA, else MPS, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    TrainError when the device is not there (no CUDA build, index out of range, no MPS)."""
    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise TrainError(
            f"--device: unknown device {spec!r}; use auto, cpu, cuda[:N] or mps"
        ) from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError("--device cuda: this torch build sees no CUDA device")
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise TrainError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
        return torch.device("cuda", index)
    if device.type == "mps":
        if not _mps_available():
            raise TrainError("--device mps: MPS is not available on this machine")
        return device
    raise TrainError(f"--device: unsupported device {spec!r}; use auto, cpu, cuda[:N] or mps")


@dataclass(frozen=True)
class Precision:
    """Autocast and gradient scaling for one device and precision name."""

    device: torch.device
    name: str = "fp32"

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            raise TrainError(f"--precision must be one of {', '.join(PRECISIONS)}")
        cuda = self.device.type == "cuda"
        if self.name == "bf16" and cuda and not torch.cuda.is_bf16_supported():
            raise TrainError("--precision bf16: this CUDA device has no bfloat16 support")

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, None for fp32."""
        return _DTYPES.get(self.name)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Autocast for the forward pass (a no-op in fp32)."""
        if self.dtype is None:
            yield
            return
        with torch.autocast(device_type=self.device.type, dtype=self.dtype):
            yield

    def scaler(self) -> torch.amp.GradScaler:
        """A ``torch.amp.GradScaler`` for fp16 (a disabled one otherwise)."""
        enabled = self.name == "fp16"
        return torch.amp.GradScaler(self.device.type, enabled=enabled)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """``batch`` with every tensor moved to ``device`` (others untouched)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
