"""Installing the fused kernels (``fused.FusedKernels``) on a model: the modules whose
forward a recorded step runs through a kernel instead of its torch ops, each only where
the kernel gives what the module's own computation gives on a probe input, and only
inside ``FusedKernels.recording()`` (outside it every module runs its own forward).

- ``install_rms_norms``: RMSNorm modules (Gemma's ``1 + weight`` form, say, is left
  alone); in a llama-style layer each norm also knows the module its output goes to
  (``NORM_FEEDS``), whose sibling projections' adapter deltas its launch then computes
  where their plans take them (``flora.serving.backends.triton_graph.rms_norm_with_deltas``).
- ``install_rope``: the rotary embedding, through transformers' per-module kernel hook.
- ``install_silu_mlps``: SiLU MLPs (transformers' Llama MLP forward): SiLU-and-multiply in
  one launch, which computes down's delta too where its plan takes it
  (``silu_mul_with_delta``).
- ``install_sibling_gemms``: sibling projections (q/k/v, gate/up) get their weights as
  one tensor (``flora.serving.siblings``), so one GEMM computes them all: for base rows
  here (``_GraphSiblings``), for adapter rows in their decode group's plans.

``o_delta_for`` is the attention's side of the same hand-off: the decode attention kernel
(``FusedKernels.decode_attention``) computes the delta of the projection that reads its
output (a llama attention's ``o_proj``) where that projection's plan takes it.
"""

from __future__ import annotations

import logging
import math
import types
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from flora.serving.backends.base import PerInput
from flora.serving.backends.triton_gpu import (
    ODelta,
    attention_o_delta,
    rms_norm_with_deltas,
    silu_mul_with_delta,
)
from flora.serving.base import ServedModule, ServingPolicy
from flora.serving.siblings import Concatenated, joint_of, share_storage
from flora_server.engine.paged.fused import FusedKernels

__all__ = [
    "NORM_FEEDS",
    "ROTARY_KERNEL_NAME",
    "install_rms_norms",
    "install_rope",
    "install_sibling_gemms",
    "install_silu_mlps",
    "o_delta_for",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

# The hub-kernel layer name transformers gives `apply_rotary_pos_emb`
# (`use_kernel_forward_from_hub("rotary_pos_emb")`), which keys an attention module's
# private wrapper of it.
ROTARY_KERNEL_NAME = "rotary_pos_emb"


class _GraphNorm:
    """An RMSNorm module's forward: the kernel inside ``kernels.recording()``, else the
    module's own forward. ``feeds`` (``install_rms_norms``): the module this norm's output
    goes to (a llama layer's attention or MLP); where the sibling projections among its
    children are one decode group, the norm's launch computes their deltas too
    (``rms_norm_with_deltas``)."""

    def __init__(self, kernels: FusedKernels, weight: torch.Tensor, eps: float, own: Any) -> None:
        self.kernels, self.weight, self.eps, self.own = kernels, weight, eps, own
        self.feeds: torch.nn.Module | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.kernels.active:
            return self.own(x)
        if self.feeds is not None and self.kernels.prologues:
            plans = [_plan(m) for m in self.feeds.children()]
            y = rms_norm_with_deltas(plans, x, self.weight, self.eps)
            if y is not None:
                return y
        return self.kernels.rms_norm(x, self.weight, self.eps)


def _plan(module: object) -> Any:
    """A served module's current plan (``None`` for a module not served)."""
    return module.plan if isinstance(module, ServedModule) else None


def _base_of(module: object) -> object:
    """The layer a served module wraps (a module not served: itself)."""
    return module.base_layer if isinstance(module, ServedModule) else module


# The projection that reads a llama-style attention module's output: a hint, as
# `NORM_FEEDS` is (the projection takes the delta only when called on that very output).
ATTENTION_OUTPUT_FEEDS = "o_proj"


def o_delta_for(
    kernels: FusedKernels, attention: torch.nn.Module, out: torch.Tensor
) -> ODelta | None:
    """Where the adapter deltas inside the kernels are on (``kernels.prologues``, and
    ``o_deltas`` after the device's self-test): the arguments with which the decode
    attention writing ``out`` ([T, H, D], contiguous) also writes the delta of
    ``attention``'s output projection, whose call on ``out`` flattened then takes it
    (``attention_o_delta``); ``None`` otherwise."""
    if not (kernels.prologues and kernels.o_deltas):
        return None
    plan = _plan(getattr(attention, ATTENTION_OUTPUT_FEEDS, None))
    return attention_o_delta(plan, out.view(out.shape[0], -1))


class _GraphMLP:
    """A SiLU MLP module's forward (transformers' Llama MLP: ``down(act(gate(x)) *
    up(x))``): inside ``kernels.recording()`` SiLU-and-multiply is one kernel, which also
    computes down's adapter delta where down's plan takes it (``silu_mul_with_delta``);
    outside, the module's own forward."""

    def __init__(self, kernels: FusedKernels, module: Any, own: Any) -> None:
        self.kernels, self.module, self.own = kernels, module, own  # module: its children vary

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.kernels.active:
            return self.own(x)
        m = self.module
        gate, up, down = m.gate_proj(x), m.up_proj(x), m.down_proj
        act = silu_mul_with_delta(_plan(down), gate, up) if self.kernels.prologues else None
        if act is None:
            act = self.kernels.silu_mul(gate, up)
        return down(act)


class _GraphSiblings:
    """Sibling projections of one module (q/k/v of an attention, gate/up of an MLP) whose
    weights are one tensor (``install_sibling_gemms``): inside ``kernels.recording()``,
    while every one of them runs its base layer (no adapter plan: a decode group computes
    its members at once itself), the first called on an input computes all their outputs
    with one GEMM, and each takes its columns (``PerInput``: only for that very input);
    otherwise each runs its own forward."""

    def __init__(
        self,
        kernels: FusedKernels,
        parent: torch.nn.Module,
        names: list[str],
        linears: list[torch.nn.Linear],
    ) -> None:
        self.kernels, self.parent, self.names, self.linears = kernels, parent, names, linears
        self.shared = PerInput(len(names))

    def forward(self, member: int, own: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        """The forward of sibling ``member`` (its own: ``own``)."""

        def forward(x: torch.Tensor) -> torch.Tensor:
            joint = self._joint()
            if joint is None:
                return own(x)
            out = self.shared.take(x, member, lambda: F.linear(x, joint.weight, joint.bias))
            first, end = joint.columns[member]
            return out[..., first:end]

        return forward

    def _joint(self) -> Concatenated | None:
        """The siblings' weights as one tensor, where one GEMM serves them now."""
        if not (self.kernels.active and self.kernels.sibling_gemms):
            return None
        for name, linear in zip(self.names, self.linears, strict=True):
            module = getattr(self.parent, name, None)
            if _base_of(module) is not linear or _plan(module) is not None:
                return None  # re-wrapped elsewhere, or its own plan computes it
        return joint_of(self.linears)


def install_sibling_gemms(model: torch.nn.Module, kernels: FusedKernels) -> int:
    """Give the sibling projections of every module of ``model`` (the children that
    ``ServingPolicy.shared_inputs`` names, two or more linear layers of one input width,
    all with a bias or none: a llama attention's q/k/v, Qwen2's with their biases, an
    MLP's gate/up) one weight tensor and one bias tensor (``share_storage``; each keeps
    its own as views of them), and serve their base rows with one GEMM inside
    ``kernels.recording()`` (``_GraphSiblings``); returns how many sibling sets. Call
    before any graph is recorded (the weights move). Idempotent."""
    served, groups = 0, ServingPolicy().shared_inputs
    for parent in model.modules():
        for group in groups:
            names = [n for n in group if isinstance(getattr(parent, n, None), torch.nn.Module)]
            bases = [_base_of(getattr(parent, n)) for n in names]
            linears = [m for m in bases if isinstance(m, torch.nn.Linear)]
            if len(linears) < 2 or len(linears) != len(names):
                continue
            if any(type(m) is not torch.nn.Linear for m in linears):
                continue  # a subclass (quantised, say) computes something else
            if any("forward" in vars(linear) for linear in linears):
                continue  # served already
            if share_storage(linears) is None:
                continue
            siblings = _GraphSiblings(kernels, parent, names, linears)
            for member, linear in enumerate(linears):
                linear.forward = siblings.forward(member, linear.forward)  # type: ignore[method-assign]
            served += 1
    return served


def _graph_rope(
    wrapper: Any,
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward of an attention module's rotary-embedding wrapper (transformers'
    per-module kernel hook, ``install_rope``; bound to the wrapper, as the hook calls
    ``forward.__func__`` under a compiler): the kernel inside ``kernels.recording()``
    where it takes the inputs, else the module's own function."""
    kernels, own = wrapper._flora_rope
    if kernels.active and unsqueeze_dim == 1 and kernels.rope_fits(q, k, cos, sin):
        return kernels.rope(q, k, cos, sin)
    return own(q, k, cos, sin, unsqueeze_dim)


def install_rms_norms(model: torch.nn.Module, kernels: FusedKernels) -> int:
    """Serve every RMSNorm module of ``model`` through ``kernels.rms_norm`` inside
    ``kernels.recording()``, where the kernel gives what the module's own forward gives
    on a probe input (the same values in its dtype, to a rounding of the float32
    statistics); returns how many. Idempotent: a module already served keeps its
    forward."""

    def find(module: torch.nn.Module) -> tuple[torch.Tensor, float] | None:
        if not type(module).__name__.endswith("RMSNorm") or "forward" in vars(module):
            return None
        eps, weight = _eps_of(module), getattr(module, "weight", None)
        if eps is None or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
            return None
        return weight, eps

    def serve(module: torch.nn.Module, found: tuple[torch.Tensor, float]) -> None:
        module.forward = _GraphNorm(kernels, *found, module.forward)

    served = _serve_where_same(
        model, "RMSNorm", find, lambda m, f: _same_as_module(m, kernels, *f), serve
    )
    for layer in model.modules():
        for norm_name, feeds_name in NORM_FEEDS.items():
            norm, feeds = getattr(layer, norm_name, None), getattr(layer, feeds_name, None)
            forward = vars(norm).get("forward") if isinstance(norm, torch.nn.Module) else None
            if isinstance(forward, _GraphNorm) and isinstance(feeds, torch.nn.Module):
                forward.feeds = feeds
    return served


# Where a norm's output goes in a llama-style decoder layer: the norm (a child of the
# layer) -> the layer's child whose sibling projections read it (q/k/v, gate/up: the
# groups `ServingPolicy.shared_inputs` names). Only a hint: the deltas a norm computes are
# taken only by a projection called with that very output (`PerInput`).
NORM_FEEDS = {"input_layernorm": "self_attn", "post_attention_layernorm": "mlp"}


def install_silu_mlps(model: torch.nn.Module, kernels: FusedKernels) -> int:
    """Serve every SiLU MLP of ``model`` through ``kernels.silu_mul`` (and down's adapter
    delta in the same launch, ``_GraphMLP``) inside ``kernels.recording()``: modules
    whose forward is transformers' Llama MLP forward (the same code: Mistral's and
    Qwen's are copies of it) and whose ``act_fn(gate) * up`` the kernel gives on a probe
    input; returns how many. Idempotent."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    llama = LlamaMLP.forward.__code__

    def find(module: torch.nn.Module) -> torch.Tensor | None:
        code = getattr(type(module).forward, "__code__", None)
        if "forward" in vars(module) or code is None:
            return None
        if (code.co_code, code.co_names) != (llama.co_code, llama.co_names):
            return None
        return next(module.parameters(), None)

    def matches(module: torch.nn.Module, like: torch.Tensor) -> bool:
        return _silu_mul_matches(module.act_fn, kernels, like)

    def serve(module: torch.nn.Module, like: torch.Tensor) -> None:
        module.forward = _GraphMLP(kernels, module, module.forward)

    return _serve_where_same(model, "SiLU MLP", find, matches, serve)


def _eps_of(module: torch.nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float) and math.isfinite(value):
            return value
    return None


def install_rope(model: torch.nn.Module, kernels: FusedKernels) -> int:
    """Serve the rotary embedding of every attention module of ``model`` through
    ``kernels.rope`` inside ``kernels.recording()``, where the kernel gives what the
    module's own ``apply_rotary_pos_emb`` gives on a probe input; returns how many.

    The hook is transformers' own: an attention class decorated with
    ``use_kernelized_func(apply_rotary_pos_emb)`` keeps a private wrapper of the function
    per instance (``_kernel_funcs[ROTARY_KERNEL_NAME]``, with the ``kernels`` package
    installed) and routes its forward's call of the module-level function through it; its
    ``forward`` is what ``kernels.kernelize`` replaces, and what this replaces. Modules
    without the hook keep their rotary embedding. Idempotent."""

    def find(module: torch.nn.Module) -> tuple[Any, int, torch.Tensor] | None:
        funcs = vars(module).get("_kernel_funcs")
        wrapper = funcs.get(ROTARY_KERNEL_NAME) if isinstance(funcs, dict) else None
        dim, weight = getattr(module, "head_dim", None), next(module.parameters(), None)
        if wrapper is None or "forward" in vars(wrapper):
            return None
        if not isinstance(dim, int) or weight is None:
            return None
        return wrapper, dim, weight

    def matches(module: torch.nn.Module, found: tuple[Any, int, torch.Tensor]) -> bool:
        wrapper, dim, weight = found
        return _rope_matches(wrapper.forward, kernels, dim, weight)

    def serve(module: torch.nn.Module, found: tuple[Any, int, torch.Tensor]) -> None:
        wrapper = found[0]
        wrapper._flora_rope = (kernels, wrapper.forward)
        wrapper.forward = types.MethodType(_graph_rope, wrapper)

    return _serve_where_same(model, "rotary embedding", find, matches, serve)


def _serve_where_same(
    model: torch.nn.Module,
    what: str,
    find: Callable[[torch.nn.Module], T | None],
    matches: Callable[[torch.nn.Module, T], bool],
    serve: Callable[[torch.nn.Module, T], None],
) -> int:
    """``serve`` every module of ``model`` that ``find`` takes (with what it found), where
    ``matches`` (the kernel against the module's own computation on a probe, run once per
    module class) holds; returns how many were served."""
    served = 0
    checked: dict[type, bool] = {}
    for module in model.modules():
        found = find(module)
        if found is None:
            continue
        kind = type(module)
        if kind not in checked:
            checked[kind] = matches(module, found)
            if not checked[kind]:
                log.info("%s keeps its own %s: the fused one differs", kind.__name__, what)
        if checked[kind]:
            serve(module, found)
            served += 1
    return served


@torch.inference_mode()
def _same_as_module(
    module: torch.nn.Module, kernels: FusedKernels, weight: torch.Tensor, eps: float
) -> bool:
    gen = torch.Generator().manual_seed(0)
    probe = (torch.randn(4, weight.shape[0], generator=gen) * 3).to(weight.device, weight.dtype)
    want: Any = module(probe)
    return _close(kernels.rms_norm(probe, weight, eps), want)


@torch.inference_mode()
def _rope_matches(own: Any, kernels: FusedKernels, dim: int, like: torch.Tensor) -> bool:
    """The kernel against a module's own rotary embedding on random queries, keys and
    angles in the module's dtype, on its device (2 query heads, 1 key head, 3 tokens)."""
    if dim % 2:
        return False
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(like.device, like.dtype)

    q, k = rand(1, 2, 3, dim), rand(1, 1, 3, dim)
    angles = torch.rand(1, 3, dim, generator=gen) * 6.3
    cos, sin = (f(angles).to(like.device, like.dtype) for f in (torch.cos, torch.sin))
    want: Any = own(q, k, cos, sin)
    got = kernels.rope(q, k, cos, sin)
    return isinstance(want, tuple) and len(want) == 2 and all(map(_close, got, want))


@torch.inference_mode()
def _silu_mul_matches(act_fn: Any, kernels: FusedKernels, like: torch.Tensor) -> bool:
    """The kernel against a module's own ``act_fn(gate) * up`` on random inputs in the
    module's dtype, on its device."""
    gen = torch.Generator().manual_seed(0)
    gate, up = (
        (torch.randn(4, 96, generator=gen) * 4).to(like.device, like.dtype) for _ in range(2)
    )
    want: Any = act_fn(gate) * up
    return _close(kernels.silu_mul(gate, up), want)


def _close(got: torch.Tensor, want: Any) -> bool:
    """``got`` is what a module's own forward gave (``want``): same shape and dtype, values
    to float32 rounding (float32) or one rounding of the half type."""
    if not isinstance(want, torch.Tensor) or want.shape != got.shape or want.dtype != got.dtype:
        return False
    tol = 1e-5 if want.dtype == torch.float32 else 1e-2
    return bool(torch.allclose(got.float(), want.float(), rtol=tol, atol=tol))
