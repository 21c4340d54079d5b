"""Checkpoints: the adapter (format v1) plus the trainer state, all safetensors + JSON.

``<dir>/adapter_config.json`` + ``adapter.safetensors`` are a normal adapter (loadable with
``flora.load_adapter``); ``trainer_state.safetensors`` holds the AdamW moments (keyed by
parameter name) and the torch RNG state; ``trainer_state.json`` the step and loss history,
and in fp16 runs the gradient scaler's state (its scale and growth counter: a few numbers).
No pickle anywhere.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import flora
from flora.adapter.adapter import FULL_PREFIX
from flora.train.errors import TrainError

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
_RNG_KEY = "rng.torch"
SCALER_KEY = "grad_scaler"
# GradScaler.state_dict() of an enabled scaler: which entries are counters, which factors.
_SCALER_INTS = ("growth_interval", "_growth_tracker")
_SCALER_FLOATS = ("scale", "growth_factor", "backoff_factor")


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    adapter_kwargs: dict[str, Any],
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Write adapter + optimizer moments + RNG + ``state`` (step, losses, ...), plus the
    state of ``scaler`` when it is enabled (fp16; other runs' checkpoints have none)."""
    flora.save_adapter(model, directory, **adapter_kwargs)
    names = {id(p): n for n, p in model.named_parameters()}
    tensors: dict[str, torch.Tensor] = {_RNG_KEY: torch.get_rng_state()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"opt.{names[id(p)]}.{key}"] = value.detach().cpu().reshape(value.shape)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / STATE_TENSORS))
    if scaler is not None and scaler.is_enabled():
        state = {**state, SCALER_KEY: scaler.state_dict()}
    (directory / STATE_JSON).write_text(json.dumps(state, indent=1))


def check_checkpoint_dir(directory: Path) -> None:
    """TrainError unless ``directory`` holds a checkpoint's files (the cheap check, done
    before anything is loaded; :func:`load_checkpoint` checks the rest)."""
    if not (directory / STATE_JSON).is_file() or not (directory / STATE_TENSORS).is_file():
        raise TrainError(f"--resume {directory}: not a checkpoint (no {STATE_JSON})")


def load_checkpoint(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Load a checkpoint into an injected ``model`` and its ``optimizer``; returns the
    saved state dict. TrainError if the directory is not a checkpoint of this model."""
    check_checkpoint_dir(directory)
    try:
        adapter = flora.load_adapter(directory)
    except flora.AdapterError as exc:
        raise TrainError(f"--resume {directory}: {exc}") from None
    _copy_adapter(model, adapter)
    saved = load_file(str(directory / STATE_TENSORS))
    params = dict(model.named_parameters())
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = next(n for n, q in params.items() if q is p)
            prefix = f"opt.{name}."
            entry = {k[len(prefix) :]: v for k, v in saved.items() if k.startswith(prefix)}
            if entry:
                # AdamW keeps its step count on the CPU and its moments beside the parameter.
                optimizer.state[p] = {
                    k: v if k == "step" else v.to(p.device) for k, v in entry.items()
                }
    torch.set_rng_state(saved[_RNG_KEY])
    return json.loads((directory / STATE_JSON).read_text())


def restore_scaler(scaler: torch.amp.GradScaler, state: dict[str, Any]) -> bool:
    """Load the scaler state saved in ``state`` (a checkpoint's JSON) into an enabled
    ``scaler``. False when the scaler is enabled but the checkpoint has no state for it
    (one written before scalers were saved, or by a bf16/fp32 run): it stays fresh.
    TrainError when the saved state is malformed."""
    if not scaler.is_enabled():
        return True
    saved = state.get(SCALER_KEY)
    if saved is None:
        return False
    if not _valid_scaler_state(saved):
        raise TrainError(f"--resume: {SCALER_KEY} in {STATE_JSON} is malformed: {saved!r}")
    scaler.load_state_dict(saved)
    return True


def _valid_scaler_state(saved: Any) -> bool:
    if not isinstance(saved, dict) or set(saved) != {*_SCALER_INTS, *_SCALER_FLOATS}:
        return False
    ints = all(type(saved[k]) is int and saved[k] >= 0 for k in _SCALER_INTS)
    floats = all(
        type(saved[k]) in (int, float) and math.isfinite(saved[k]) and saved[k] > 0
        for k in _SCALER_FLOATS
    )
    return ints and floats and saved["growth_interval"] > 0


def _copy_adapter(model: nn.Module, adapter: flora.Adapter) -> None:
    layers = dict(flora.adapter_layers(model))
    if set(layers) != set(adapter.modules):
        raise TrainError("--resume: the checkpoint adapts other modules than this run")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, layer in layers.items():
            if tuple(layer.core.shape) != tuple(adapter.core(name).shape):
                raise TrainError(f"--resume: ranks of {name!r} differ from this run's")
            layer.core.copy_(adapter.core(name))
            for u, value in zip(layer.factors, adapter.factors(name), strict=True):
                u.copy_(value)
        for key, value in adapter.tensors.items():
            if key.startswith(FULL_PREFIX):
                target = params.get(key[len(FULL_PREFIX) :])
                if target is None or target.shape != value.shape:
                    raise TrainError(f"--resume: {key} does not fit this run's model")
                target.copy_(value)


STEP_PREFIX = "step-"


def step_dir(root: Path, step: int) -> Path:
    """``root/step-NNNNNN``: the checkpoint of ``step`` (zero-padded, so names sort)."""
    return root / f"{STEP_PREFIX}{step:06d}"


def step_checkpoints(root: Path) -> list[Path]:
    """Complete step checkpoints under ``root``, oldest first (a directory without its
    trainer state, e.g. one cut off while being written, is skipped)."""
    if not root.is_dir():
        return []
    found = [
        d
        for d in root.iterdir()
        if d.is_dir() and d.name.startswith(STEP_PREFIX) and (d / STATE_JSON).is_file()
    ]
    return sorted(found, key=lambda d: d.name)


def prune_checkpoints(root: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest step checkpoints; returns the deleted ones."""
    import shutil

    old = step_checkpoints(root)[:-keep] if keep > 0 else []
    for d in old:
        shutil.rmtree(d, ignore_errors=True)
    return old
