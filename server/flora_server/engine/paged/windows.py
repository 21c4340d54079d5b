"""What engine v2's paged attention serves: the one rule (`attention_windows`).

The paged attention reproduces exactly, per decoder layer, causal softmax attention over
all earlier keys (a full-attention layer) or over the last W of them (a sliding-window
layer, W its window). The window of each layer is read from the model's config the way
transformers' own masks read it (`masking_utils`): a config with `layer_types` slides
exactly its "sliding_attention" layers, by `config.sliding_window`; a config without
`layer_types` slides every layer when `sliding_window` is set (Mistral, Phi-3,
Starcoder2), unless `use_sliding_window` is off (older Qwen2 configs). Each attention
module that names its own `sliding_window` (Qwen2, Gemma3, ...) must agree with that.

Everything else the paged attention or the runner cannot reproduce is refused here, at
start-up, with the reason: other layer types (linear attention, mamba, chunked), attention
logit soft-capping (Gemma2: SDPA applies no tanh to the scores), attention sinks (GPT-OSS:
a learned per-head logit joins every softmax), bidirectional attention, and final logit
soft-capping or scaling (the runner applies the LM head alone).
"""

from __future__ import annotations

from typing import Any

import torch

SERVED_LAYER_TYPES = {"full_attention", "sliding_attention"}


def attention_windows(model: torch.nn.Module) -> tuple[int | None, ...]:
    """Each decoder layer's sliding window (None: full attention), indexed by layer; raises
    ValueError naming what engine v2 cannot serve."""
    config: Any = model.config
    for name, what in (
        ("attn_logit_softcapping", "attention logit soft-capping (SDPA cannot apply it)"),
        ("final_logit_softcapping", "final logit soft-capping (the LM head runs alone)"),
        ("attention_chunk_size", "chunked attention"),
    ):
        if getattr(config, name, None) is not None:
            raise ValueError(f"engine v2 does not serve {what}: config.{name} is set")
    for name in ("logit_scale", "logits_scaling"):  # Cohere multiplies, Granite divides
        if getattr(config, name, 1.0) not in (None, 1, 1.0):
            raise ValueError(
                f"engine v2 does not serve scaled final logits (the LM head runs alone): "
                f"config.{name} = {getattr(config, name)}"
            )
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("engine v2 serves causal attention only: use_bidirectional_attention")
    layers: int = config.num_hidden_layers
    window = getattr(config, "sliding_window", None) or None
    if not getattr(config, "use_sliding_window", True):
        window = None
    types = getattr(config, "layer_types", None)
    if types:
        other = set(types) - SERVED_LAYER_TYPES
        if other:
            raise ValueError(
                f"engine v2 serves full and sliding attention layers only, not {sorted(other)}"
            )
        if len(types) != layers:
            raise ValueError(f"engine v2: {len(types)} layer_types for {layers} layers")
        if "sliding_attention" in types and window is None:
            raise ValueError("engine v2: sliding_attention layers without a sliding_window")
        windows = tuple(window if t == "sliding_attention" else None for t in types)
    else:
        windows = (window,) * layers
    _check_modules(model, windows)
    return windows


def _check_modules(model: torch.nn.Module, windows: tuple[int | None, ...]) -> None:
    """The attention modules agree with the config's windows and carry nothing the paged
    attention would drop."""
    for name, module in model.named_modules():
        if isinstance(getattr(module, "sinks", None), torch.Tensor):
            raise ValueError(f"engine v2 does not serve attention sinks ({name}.sinks)")
        layer = getattr(module, "layer_idx", None)
        if not isinstance(layer, int) or not hasattr(module, "sliding_window"):
            continue
        own: Any = module.sliding_window or None
        if layer >= len(windows) or own != windows[layer]:
            expected = windows[layer] if layer < len(windows) else "no layer"
            raise ValueError(
                f"engine v2: {name} slides by {own}, the config by {expected}: "
                "the window rule of this model is not the one transformers' masks apply"
            )
