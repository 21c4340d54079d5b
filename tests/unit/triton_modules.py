"""Triton kernel modules for tests: compiled on a CUDA machine, else run by Triton's
interpreter on the CPU."""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from flora.serving.backends.triton_gpu import KERNEL_MODULES

__all__ = ["KERNEL_MODULES", "triton_modules"]


@contextlib.contextmanager
def triton_modules(
    monkeypatch: pytest.MonkeyPatch, device: torch.device, *names: str
) -> Iterator[list[ModuleType]]:
    """The modules ``names`` (and the adapter kernels' ``KERNEL_MODULES``, which the others
    call into) as the device runs them: on the CPU, ``TRITON_INTERPRET`` is read when
    ``triton.jit`` decorates, so they are imported afresh with it on, and dropped after."""
    every = (*KERNEL_MODULES, *names)
    if device.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        for name in every:
            monkeypatch.delitem(sys.modules, name, raising=False)
    try:
        yield [importlib.import_module(name) for name in names]
    finally:
        if device.type == "cpu":
            for name in every:
                sys.modules.pop(name, None)
