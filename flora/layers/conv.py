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

from flora.kinds import ModuleSpec
from flora.layers.base import FloraLayer
from flora.tucker import mode_product

__all__ = ["FloraConv"]

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class FloraConv(FloraLayer):
    """ConvNd wrapper; ``kind`` is ``"conv1d"``, ``"conv2d"`` or ``"conv3d"``.

    Two exact ways to apply ``dW`` on activations, chosen once at construction by
    multiply-adds per output position:

    - three convolutions (the paper's form), each keeping the base's ``groups`` g:
      a 1x1 reduce ``in -> g*r_in`` whose per-group weight is ``U_in^T``; a core conv
      ``g*r_in -> g*r_out`` whose per-group kernel is ``G x_3 U_k1 ... x_N U_km`` with the
      base's stride/padding/dilation/padding_mode; a 1x1 expand ``g*r_out -> out`` whose
      weight is ``U_out``. Output channel o of group j then sees only group j's inputs,
      as in ``conv(x, W + dW, groups=g)``. Cost ``in*r_in + g*r_out*r_in*K + out*r_out``.
    - one conv with the materialised ``dW`` (``out*(in/g)*K``). For depthwise and other
      small-group convs this is far cheaper: the three-conv form carries ``g*r_out``
      intermediate channels (e.g. 960*8 for a 960-channel depthwise conv, 8x more work
      than the base conv itself), while ``dW`` is as small as the base kernel.

    The 1x1 reduce commutes with any padding mode (it is per-pixel and linear), so
    padding belongs to the core conv only.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        ranks: Sequence[int],
        scale: float = 1.0,
        dropout: float = 0.0,
    ) -> None:
        self.kind = {1: "conv1d", 2: "conv2d", 3: "conv3d"}[base_layer.weight.dim() - 2]
        super().__init__(base_layer, ranks, scale, dropout)
        out_ch, in_per_group, *kernel = self.spec.weight_shape
        g = self.spec.groups
        r_out, r_in = self.ranks[:2]
        k = 1
        for d in kernel:
            k *= d
        three = in_per_group * g * r_in + g * r_out * r_in * k + out_ch * r_out
        direct = out_ch * in_per_group * k
        self.use_direct = direct <= three

    @classmethod
    def spec_of(cls, module: nn.Module) -> ModuleSpec:
        shape = tuple(module.weight.shape)
        kind = {3: "conv1d", 4: "conv2d", 5: "conv3d"}[len(shape)]
        return ModuleSpec(kind, shape, groups=int(module.groups))

    def core_kernel(self) -> torch.Tensor:
        """``G x_3 U_k1 ... x_N U_km``: shape ``(r_out, r_in, k_1..k_m)``."""
        kernel = self.core
        for mode in range(2, self.core.dim()):
            kernel = mode_product(kernel, self.factors[mode], mode)
        return kernel

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, in, *spatial] (or unbatched [in, *spatial]) -> [B, out, *spatial_out]
        x = self.dropout(x.to(self.core.dtype))
        if self.use_direct:
            return self.base_layer._conv_forward(x, self.delta_weight(), None)
        return self._three_conv(x)

    def _three_conv(self, x: torch.Tensor) -> torch.Tensor:
        g = self.spec.groups
        nd = self.core.dim() - 2
        conv = _CONV_FN[nd]
        ones = (1,) * nd
        u_out, u_in = self.factors[0], self.factors[1]
        # reduce: per group, in/g -> r_in with U_in^T; same weights for every group.
        reduce_w = u_in.T.repeat(g, 1).reshape(g * u_in.shape[1], u_in.shape[0], *ones)
        h = conv(x, reduce_w, groups=g)
        # core: per group r_in -> r_out; the base's _conv_forward brings its stride,
        # padding, dilation, padding_mode and groups (= g, matching our channel blocks).
        core_w = self.core_kernel().repeat(g, *(1,) * (nd + 1))
        h = self.base_layer._conv_forward(h, core_w, None)
        # expand: out channel o (group o // (out/g)) mixes its group's r_out channels.
        h = conv(h, u_out.reshape(*u_out.shape, *ones), groups=g)
        return h * self.scale
