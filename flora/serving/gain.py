"""How far an adapter's update can amplify its inputs: the update's gain (the largest
output for inputs of magnitude at most 1) and a cheap upper bound of it from the factors
alone. `ServingModel.check_output_range` refuses an update whose gain would overflow the
served activations.
"""

from __future__ import annotations

import math

import torch

from flora.serving.factors import ModuleFactors, tucker_full

__all__ = ["FLOAT32_GAIN_LIMIT", "update_gain", "update_gain_bound"]

# The gain limit of `ServingModel.check_output_range`: an update that multiplies inputs of
# size 1 by g, followed by another such update (q and k meet in q k^T; up feeds down), gives
# g^2, which the next normalisation (LayerNorm, RMSNorm: computed in float32) squares: g^4
# must stay below float32's largest value, so g < 3.4e38 ** (1/4) = 4.3e9. (MiniLM-L6
# measured: outputs turn NaN from g = 2.2e16 on; a trained adapter has g of about 20.)
FLOAT32_GAIN_LIMIT = float(torch.finfo(torch.float32).max) ** 0.25
_GAIN_CHUNK = 1 << 22  # elements of dW materialised at once by `update_gain`


def _output_mode(kind: str) -> int | None:
    """The mode of ``dW`` that indexes the module's outputs (None: an embedding, whose
    output for an id is one row of ``dW``)."""
    if kind == "embedding":
        return None
    return 1 if kind == "hf_conv1d" else 0


def update_gain_bound(mf: ModuleFactors) -> float:
    """An upper bound of :func:`update_gain` from the factors alone (no ``dW``):
    ``|dW[o, i..]| <= |s| sum |G_ab..| |U_0[o, a]| |U_1[i, b]| ..``, so summing over the
    input modes replaces their factors by column sums of ``|U|`` (an embedding: every
    factor by its column maxima). Tight when signs agree; costs a few small products."""
    out_mode = _output_mode(mf.kind)
    factors = []
    for m, u in enumerate(mf.factors):
        a = u.float().abs()
        if m == out_mode:
            factors.append(a)
        elif out_mode is None:
            factors.append(a.amax(dim=0, keepdim=True))
        else:
            factors.append(a.sum(dim=0, keepdim=True))
    bound = tucker_full(mf.core.float().abs(), factors, abs(float(mf.scale)))
    return float(bound.max())


def update_gain(mf: ModuleFactors) -> float:
    """The largest output of the update for inputs of magnitude at most 1: ``max_o sum_i
    |dW[o, i..]|`` over the output mode ``o`` (the update's induced infinity norm); for an
    embedding, whose input is one id, ``max |dW|``. Materialises ``dW`` in row chunks."""
    s = float(mf.scale)
    if mf.kind not in ("linear", "hf_conv1d", "embedding"):  # conv: small kernels, whole
        dw = tucker_full(mf.core.float(), [u.float() for u in mf.factors], s)
        return float(dw.reshape(dw.shape[0], -1).abs().sum(dim=1).max())
    u0, u1 = (u.float() for u in mf.factors)
    rest = s * (mf.core.float() @ u1.t())  # (r_0, d_1): dW = U_0 @ rest
    step = max(1, _GAIN_CHUNK // max(1, rest.shape[1]))
    if mf.kind == "hf_conv1d":  # (in, out): the outputs are the columns
        sums = torch.zeros(rest.shape[1])
        for start in range(0, u0.shape[0], step):
            sums += (u0[start : start + step] @ rest).abs().sum(dim=0)
        return float(sums.max())
    best = 0.0
    for start in range(0, u0.shape[0], step):
        rows = (u0[start : start + step] @ rest).abs()
        value = float(rows.max() if mf.kind == "embedding" else rows.sum(dim=1).max())
        if not math.isfinite(value):  # max() would pass over a NaN
            return math.inf
        best = max(best, value)
    return best
