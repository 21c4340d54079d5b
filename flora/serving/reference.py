"""Plain-PyTorch reference for the served layers: one row at a time with ``W + dW``.

Slow on purpose and independent of the fast paths (no folding, no banks, no masks):
``dW`` comes from an explicit sum over the core (``einsum``), and every row runs the base
module's own functional op with its merged weight. Tests compare the fast paths to it.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flora.serving.factors import ModuleFactors

__all__ = ["reference_delta", "reference_forward", "reference_model_weights"]


def reference_delta(mf: ModuleFactors) -> torch.Tensor:
    """``dW[i_1..i_N] = s * sum_{a_1..a_N} G[a_1..a_N] U_1[i_1, a_1] ... U_N[i_N, a_N]``."""
    n = mf.core.dim()
    core_idx = string.ascii_lowercase[:n]
    out_idx = string.ascii_uppercase[:n]
    spec = ",".join([core_idx] + [f"{o}{c}" for o, c in zip(out_idx, core_idx, strict=True)])
    full = torch.einsum(f"{spec}->{out_idx}", mf.core.double(), *[u.double() for u in mf.factors])
    return (mf.scale * full).float()


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    value = getattr(module, name)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"reference: {type(module).__name__}.{name} is not a tensor")
    return value


def _row_forward(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``module`` on one row (``x`` with a leading batch dim of 1) with ``weight``."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, module.bias)
    if isinstance(module, nn.Embedding):
        return F.embedding(x, weight, module.padding_idx)
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return module._conv_forward(x, weight, module.bias)
    if type(module).__name__ == "Conv1D":  # transformers Conv1D: y = x @ W + b, W (in, out)
        return x @ weight + _tensor(module, "bias")
    raise TypeError(f"reference: unsupported module {type(module).__name__}")


def reference_forward(
    module: nn.Module,
    x: torch.Tensor,
    row_slots: Sequence[int | None],
    slots: Mapping[int, ModuleFactors],
) -> torch.Tensor:
    """Run each row ``b`` of ``x`` through ``module`` with ``W + dW(slots[row_slots[b]])``
    (the base weight when the row's slot is ``None``/-1 or does not target the module)."""
    w = _tensor(module, "weight").detach()
    outs = []
    for b, s in enumerate(row_slots):
        mf = slots.get(s) if s is not None and s >= 0 else None
        weight = w if mf is None else (w.float() + reference_delta(mf).to(w.device)).to(w.dtype)
        outs.append(_row_forward(module, x[b : b + 1], weight))
    return torch.cat(outs)


def reference_model_weights(
    model: nn.Module, modules: Mapping[str, ModuleFactors]
) -> dict[str, torch.Tensor]:
    """``{name.weight: W + dW}`` for ``model.load_state_dict(..., strict=False)``: a whole
    model with one adapter applied, to run single rows through."""
    out = {}
    for name, mf in modules.items():
        w = _tensor(model.get_submodule(name), "weight").detach()
        out[f"{name}.weight"] = (w.float() + reference_delta(mf).to(w.device)).to(w.dtype)
    return out
