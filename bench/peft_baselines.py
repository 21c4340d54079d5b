"""PEFT's LoRA and LoHa as the quality bench's baselines: injected where FLoRA would be,
at the rank whose trainable-parameter count is closest to FLoRA's."""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

import flora


def peft_count(model: nn.Module, targets: list[str] | str, rank: int, method: str) -> int:
    """Trainable parameters PEFT adds at ``rank``: LoRA r*(in*K + out) per module, LoHa
    twice that (two Hadamard-multiplied low-rank pairs)."""
    total = 0
    for name, m in model.named_modules():
        if not _matches(name, targets):
            continue
        if isinstance(m, nn.Linear):
            per = m.in_features + m.out_features
        elif isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1]
            per = m.in_channels // m.groups * k + m.out_channels
        else:
            continue
        total += rank * per * (2 if method == "loha" else 1)
    return total


def _matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def peft_inject(method: str, flora_adapter_params: int) -> Callable[..., nn.Module]:
    """A stand-in for ``flora.inject`` that puts PEFT's ``method`` on the same targets at
    the rank closest to FLoRA's trainable-parameter count, keeping ``train_modules``."""
    from peft import LoHaConfig, LoraConfig, inject_adapter_in_model

    def inject(model: nn.Module, config: flora.FloraConfig) -> nn.Module:
        targets = config.target_modules
        rank = min(
            range(1, 129),
            key=lambda r: abs(peft_count(model, targets, r, method) - flora_adapter_params),
        )
        if method == "lora":
            cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0)
        else:
            cfg = LoHaConfig(r=rank, alpha=rank, target_modules=targets)
        inject_adapter_in_model(cfg, model)
        for name in config.train_modules or []:
            model.get_submodule(name).requires_grad_(True)
        model.peft_rank = rank  # reported
        return model

    return inject
