"""FLoRA on ``nn.Conv1d/2d/3d`` (any groups, depthwise included).

Weight modes: ``(out, in/groups, k_1..k_m)``. The in-mode is ``in/groups``, so the same
update is added to every group's slice of the weight, exactly like ``W + dW`` with the
base's ``groups`` (the reference implementation uses ``in`` here, which is wrong for
grouped convs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flora.kinds import ModuleSpec, as_conv, module_kind
from flora.layers.base import FloraLayer
from flora.tucker import mode_product

__all__ = ["FloraConv"]

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class FloraConv(FloraLayer):
    """ConvNd wrapper; ``kind`` is ``"conv1d"``, ``"conv2d"`` or ``"conv3d"``.

    Three exact ways to apply ``dW`` on activations, chosen once at construction by
    multiply-adds per output position (``path``):

    - ``folded``: two convolutions, LoRA's shape. The core and kernel factors fold into
      the input factor, ``A = (G x_3 U_k1 ... x_N U_km) x_2 U_in`` of shape
      ``(r_out, in/g, k_1..k_m)`` (a few thousand multiply-adds per step, independent of
      the batch); a conv ``in -> g*r_out`` with per-group kernel ``A`` and the base's
      stride/padding/dilation/padding_mode/groups, then a 1x1 expand ``g*r_out -> out``
      with weight ``s * U_out``. Cost ``in*r_out*K + out*r_out``, what PEFT's conv LoRA
      of rank r_out pays.
    - ``three``: three convolutions (the paper's form), each keeping the base's ``groups``
      g: a 1x1 reduce ``in -> g*r_in`` whose per-group weight is ``U_in^T``; a core conv
      ``g*r_in -> g*r_out`` whose per-group kernel is ``G x_3 U_k1 ... x_N U_km``; a 1x1
      expand ``g*r_out -> out`` whose weight is ``s * U_out``. Output channel o of group j
      then sees only group j's inputs, as in ``conv(x, W + dW, groups=g)``. Cost
      ``in*r_in + g*r_out*r_in*K + out*r_out``, cheaper than ``folded`` for wide k x k
      convs, but one more pass over an activation, so it is chosen only when it saves at
      least half the multiply-adds.
    - ``direct``: one conv with the materialised ``dW`` (``out*(in/g)*K``). For depthwise
      and other small-group convs this is far cheaper: the other forms carry ``g*r_out``
      intermediate channels (e.g. 960*8 for a 960-channel depthwise conv), while ``dW``
      is as small as the base kernel.

    The 1x1 reduce commutes with any padding mode (it is per-pixel and linear), so
    padding belongs to the core conv only.
    """

    PATHS = ("direct", "folded", "three")

    def __init__(
        self,
        base_layer: nn.Module,
        ranks: Sequence[int],
        scale: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        kind = module_kind(base_layer)
        if kind not in ("conv1d", "conv2d", "conv3d"):
            raise TypeError(f"FloraConv wraps Conv1d/2d/3d, not {type(base_layer).__name__}")
        self.kind = kind
        super().__init__(base_layer, ranks, scale, dropout)
        out_ch, in_per_group, *kernel = self.spec.weight_shape
        g = self.spec.groups
        r_out, r_in = self.ranks[:2]
        k = 1
        for d in kernel:
            k *= d
        costs = {
            "direct": out_ch * in_per_group * k,
            "folded": in_per_group * g * r_out * k + out_ch * r_out,
            "three": 2 * (in_per_group * g * r_in + g * r_out * r_in * k + out_ch * r_out),
        }
        self.path = min(self.PATHS, key=lambda name: costs[name])

    @property
    def use_direct(self) -> bool:
        """Whether the materialised-``dW`` path is used (setting False picks ``three``)."""
        return self.path == "direct"

    @use_direct.setter
    def use_direct(self, value: bool) -> None:
        self.path = "direct" if value else "three"

    @classmethod
    def spec_of(cls, module: nn.Module) -> ModuleSpec:
        conv = as_conv(module)
        kind = module_kind(conv)
        assert kind is not None  # a ConvNd always has a kind
        return ModuleSpec(kind, tuple(conv.weight.shape), groups=conv.groups)

    def core_kernel(self) -> torch.Tensor:
        """``G x_3 U_k1 ... x_N U_km``: shape ``(r_out, r_in, k_1..k_m)``."""
        kernel: torch.Tensor = self.core
        with self.factor_precision():
            for mode in range(2, self.core.dim()):
                u = self.factors[mode]
                # a 1 x 1 factor (a kernel mode of size 1) scales the core: no tensordot
                scaled = u.numel() == 1
                kernel = kernel * u.reshape(()) if scaled else mode_product(kernel, u, mode)
        return kernel

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, in, *spatial] (or unbatched [in, *spatial]) -> [B, out, *spatial_out]
        x = self.dropout(x.to(self.core.dtype))
        if self.path == "direct":
            return as_conv(self.base_layer)._conv_forward(x, self.delta_weight(), None)
        if self.path == "folded":
            return self._folded(x)
        return self._three_conv(x)

    def _expand(self, h: torch.Tensor) -> torch.Tensor:
        # out channel o (group o // (out/g)) mixes its group's r_out channels, times s.
        u_out, nd = self.factors[0], self.core.dim() - 2
        if self.scale != 1.0:
            u_out = u_out * self.scale
        weight = u_out.reshape(*u_out.shape, *(1,) * nd)  # [out, r_out, 1..]
        return _CONV_FN[nd](h, weight, groups=self.spec.groups)

    def _folded(self, x: torch.Tensor) -> torch.Tensor:
        g, nd = self.spec.groups, self.core.dim() - 2
        # (r_out, in/g, k...): the core kernel with U_in applied on its input mode, as one
        # matmul (r_out*k.., r_in) @ (r_in, in/g), made contiguous for the conv kernels.
        kernel, u_in = self.core_kernel(), self.factors[1]
        rest = kernel.shape[2:]
        with self.factor_precision():
            if all(d == 1 for d in rest):  # 1x1 conv: a plain (r_out, r_in) @ (r_in, in/g)
                flat = kernel.reshape(kernel.shape[0], kernel.shape[1])
                reduce_w = (flat @ u_in.T).reshape(kernel.shape[0], u_in.shape[0], *rest)
            else:
                flat = kernel.movedim(1, -1).reshape(-1, kernel.shape[1])  # [r_out*k.., r_in]
                reduce_w = (flat @ u_in.T).reshape(kernel.shape[0], *rest, u_in.shape[0])
                reduce_w = reduce_w.movedim(-1, 1).contiguous()  # [r_out, in/g, k..]
        if g > 1:
            reduce_w = reduce_w.repeat(g, *(1,) * (nd + 1))
        # the base's _conv_forward brings stride, padding, dilation, padding_mode, groups
        return self._expand(as_conv(self.base_layer)._conv_forward(x, reduce_w, None))

    def _three_conv(self, x: torch.Tensor) -> torch.Tensor:
        g = self.spec.groups
        nd = self.core.dim() - 2
        conv = _CONV_FN[nd]
        ones = (1,) * nd
        u_in = self.factors[1]
        # reduce: per group, in/g -> r_in with U_in^T; same weights for every group.
        reduce_w = u_in.T.repeat(g, 1).reshape(g * u_in.shape[1], u_in.shape[0], *ones)
        h = conv(x, reduce_w, groups=g)
        # core: per group r_in -> r_out; the base's _conv_forward brings its stride,
        # padding, dilation, padding_mode and groups (= g, matching our channel blocks).
        core_w = self.core_kernel().repeat(g, *(1,) * (nd + 1))
        h = as_conv(self.base_layer)._conv_forward(h, core_w, None)
        return self._expand(h)
