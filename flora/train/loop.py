"""The training loop shared by every recipe.

AdamW on the trainable parameters (adapter cores/factors and ``train_modules``), linear
warm-up then cosine decay, a tqdm bar with loss and samples/s, evaluation of the base
(before the first step: FLoRA cores start at zero, so the injected model *is* the base)
and of the adapter (after the last), checkpoints with ``--resume``, and the outputs in
``--out``: the adapter (format v1), ``metrics.json`` and ``loss.png``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import flora
from flora.train.checkpoint import load_checkpoint, save_checkpoint
from flora.train.errors import TrainError
from flora.train.options import TrainOptions
from flora.train.plot import plot_loss
from flora.train.recipe import TrainTask
from flora.train.schedule import batch_indices, lr_at, total_steps

CHECKPOINTS = "checkpoints"
METRICS = "metrics.json"
LOSS_PNG = "loss.png"


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of every parameter that requires grad."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def param_groups(
    named: list[tuple[str, torch.nn.Parameter]], lr_scale: dict[str, float]
) -> list[dict[str, Any]]:
    """Optimizer groups: one per learning-rate multiplier (``lr_scale`` by module name,
    1.0 for every other parameter); the multiplier is kept in the group as ``lr_scale``."""
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, p in named:
        scale = next((s for m, s in lr_scale.items() if name.startswith(m + ".")), 1.0)
        groups.setdefault(scale, []).append(p)
    return [{"params": ps, "lr_scale": s} for s, ps in groups.items()]


def evaluate_prefixed(task: TrainTask, prefix: str, limit: int) -> dict[str, float]:
    """Run ``task.evaluate`` on the first ``limit`` eval examples (0 = all), in eval mode
    and without gradients; keys get ``prefix``."""
    examples = task.eval_examples if limit == 0 else task.eval_examples[:limit]
    task.model.eval()
    with torch.inference_mode():
        metrics = task.evaluate(task.model, examples)
    return {prefix + k: v for k, v in metrics.items()}


def run(task: TrainTask, options: TrainOptions) -> dict[str, Any]:
    """Train ``task`` as ``options`` say (already resolved); write the outputs; return
    the metrics that went to ``metrics.json``."""
    assert options.lr is not None and options.batch_size is not None
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    model = task.model
    named = trainable_parameters(model)
    if not named:
        raise TrainError("nothing to train: no parameter requires grad")
    optimizer = torch.optim.AdamW(
        param_groups(named, task.lr_scale), lr=options.lr, weight_decay=options.weight_decay
    )
    n_train = len(task.train_examples)
    steps = total_steps(n_train, options.batch_size, options.epochs, options.max_steps)
    limit = int(options.eval_limit or 0)
    adapter_kwargs = {
        "base_model_id": task.base_model_id,
        "task": task.task,
        "labels": task.labels,
        **task.metadata,
    }

    start_step, losses, seconds_before = 0, [], 0.0
    base_metrics: dict[str, float] = {}
    if options.resume is not None:
        state = load_checkpoint(options.resume, model, optimizer)
        start_step, losses = int(state["step"]), list(state["losses"])
        seconds_before = float(state.get("train_seconds", 0.0))
        base_metrics = dict(state.get("base_metrics", {}))
        if start_step > steps:
            raise TrainError(
                f"--resume: checkpoint is at step {start_step}, past the {steps} asked"
            )
    if not base_metrics:
        base_metrics = evaluate_prefixed(task, "base_", limit)
        _log(f"base: {_fmt(base_metrics)}", options)

    task.train_mode(model)
    bar = tqdm(
        total=steps,
        initial=start_step,
        desc=f"{options.recipe}",
        file=sys.stderr,
        disable=not options.progress,
        dynamic_ncols=True,
    )
    began = time.perf_counter()
    samples = 0
    for step in range(start_step, steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, options.lr, options.warmup) * group["lr_scale"]
        idx = batch_indices(n_train, options.batch_size, options.seed, step)
        batch = task.collate([task.train_examples[i] for i in idx])
        loss = task.loss(model, batch)
        if not math.isfinite(loss.item()):
            raise TrainError(f"loss became {loss.item()} at step {step}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.item()))
        samples += len(idx)
        elapsed = time.perf_counter() - began
        bar.set_postfix(loss=f"{losses[-1]:.4f}", samples_s=f"{samples / max(elapsed, 1e-9):.1f}")
        bar.update(1)
        done = step + 1
        if options.save_every and done % options.save_every == 0 and done < steps:
            _checkpoint(
                task,
                optimizer,
                out,
                done,
                losses,
                seconds_before + elapsed,
                base_metrics,
                adapter_kwargs,
            )
            task.train_mode(model)
    bar.close()
    train_seconds = seconds_before + (time.perf_counter() - began)

    _checkpoint(task, optimizer, out, steps, losses, train_seconds, base_metrics, adapter_kwargs)
    flora.save_adapter(model, out, **adapter_kwargs)
    eval_metrics = evaluate_prefixed(task, "", limit)
    _log(f"adapter: {_fmt(eval_metrics)}", options)
    metrics: dict[str, Any] = {
        **eval_metrics,
        **base_metrics,
        **(task.extra_metrics() if task.extra_metrics else {}),
        "trainable_params": sum(p.numel() for _, p in named),
        "train_seconds": round(train_seconds, 2),
        "steps": steps,
        "train_examples": n_train,
        "eval_examples": len(task.eval_examples)
        if limit == 0
        else min(limit, len(task.eval_examples)),
        "final_loss": _tail_mean(losses),
        "task": task.task,
        "labels": task.labels,
        "options": options.to_json(),
    }
    (out / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    if losses:
        plot_loss(losses, out / LOSS_PNG, f"{options.recipe}: {options.base} on {options.data}")
    return metrics


def _checkpoint(
    task: TrainTask,
    optimizer: torch.optim.Optimizer,
    out: Path,
    step: int,
    losses: list[float],
    seconds: float,
    base_metrics: dict[str, float],
    adapter_kwargs: dict[str, Any],
) -> None:
    directory = out / CHECKPOINTS / f"step-{step:06d}"
    state = {"step": step, "losses": losses, "train_seconds": seconds, "base_metrics": base_metrics}
    save_checkpoint(directory, task.model, optimizer, state, adapter_kwargs)


def _tail_mean(losses: list[float], n: int = 20) -> float | None:
    tail = losses[-n:]
    return round(sum(tail) / len(tail), 6) if tail else None


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
    )


def _log(message: str, options: TrainOptions) -> None:
    if options.progress:
        print(message, file=sys.stderr, flush=True)
