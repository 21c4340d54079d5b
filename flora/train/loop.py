"""The training loop shared by every recipe.

AdamW on the trainable parameters (adapter cores/factors and ``train_modules``), linear
warm-up then cosine decay, optional gradient accumulation and clipping, autocast in bf16
or fp16 (with a gradient scaler), a tqdm bar with loss, learning rate and samples/s.

Evaluation runs on one eval set chosen once per run (a seeded, stratified sample of at
most ``eval_limit`` examples): the base before the first step (FLoRA cores start at zero,
so the injected model *is* the base), every ``eval_every`` steps (the best adapter goes
to ``OUT/best``) and the adapter after the last step. Checkpoints support ``--resume``
(a directory or ``latest``) and ``--keep-checkpoints``. Outputs in ``--out``: the adapter
(format v1), ``metrics.json`` and ``loss.png``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import flora
from flora.adapter.io import CONFIG_NAME, WEIGHTS_NAME
from flora.train.checkpoint import (
    RUN_KEY,
    check_checkpoint_dir,
    check_run,
    check_unlocked,
    load_checkpoint,
    prune_checkpoints,
    read_state,
    remove_partial_checkpoints,
    restore_scaler,
    run_identity,
    run_lock,
    save_checkpoint,
    step_checkpoints,
    step_dir,
)
from flora.train.data import stratified_sample
from flora.train.device import Precision, to_device
from flora.train.errors import TrainError
from flora.train.options import TrainOptions
from flora.train.plot import plot_loss
from flora.train.recipe import TrainTask
from flora.train.schedule import batch_indices, lr_at, total_steps

CHECKPOINTS = "checkpoints"
BEST = "best"
METRICS = "metrics.json"
LOSS_PNG = "loss.png"
PEFT_DIR = "peft"
# Everything a run writes to --out (besides its lock file): what a run that starts afresh
# must not find there, since `--resume latest` would pick it up, or a reader would take it
# for this run's.
RUN_OUTPUTS = (CONFIG_NAME, WEIGHTS_NAME, METRICS, LOSS_PNG, BEST, PEFT_DIR, CHECKPOINTS)


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


def eval_set(task: TrainTask, limit: int, seed: int) -> list[Any]:
    """The run's eval examples: all (``limit`` 0), or a seeded sample of ``limit``,
    stratified by ``task.eval_key`` when the task has classes."""
    return stratified_sample(task.eval_examples, limit, task.eval_key, seed)


def evaluate_prefixed(
    task: TrainTask, examples: list[Any], prefix: str, precision: Precision
) -> dict[str, float]:
    """``task.evaluate`` on ``examples`` in eval mode, without gradients, under the run's
    autocast; keys get ``prefix``."""
    task.model.eval()
    with torch.inference_mode(), precision.autocast():
        metrics = task.evaluate(task.model, examples)
    return {prefix + k: v for k, v in metrics.items()}


def check_paths(options: TrainOptions) -> None:
    """The checks on ``--out`` and ``--resume`` that need no model, so a run that cannot
    write its outputs or resume fails before anything is loaded (nothing is created or
    changed here; :func:`run` checks again under the run lock): ``--out`` writable and not
    in use by another run, a checkpoint to resume that is whole and of a run with these
    options and data, no previous run's outputs where this run starts afresh (unless
    ``--overwrite``)."""
    out = options.out
    # The nearest existing path at or above --out must be a writable directory.
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise TrainError(f"--out {out}: {existing} exists and is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TrainError(f"--out {out}: {existing} is not writable")
    if options.resume is not None and str(options.resume) != "latest":
        check_checkpoint_dir(Path(options.resume))
    if out.is_dir():
        check_unlocked(out)
    resume = resolve_resume(options.resume, out)
    if resume is not None:
        check_run(read_state(resume), run_identity(options), resume)
    if out.is_dir():
        outputs_to_replace(out, resume, options.overwrite)


def previous_outputs(out: Path) -> list[str]:
    """The names of ``RUN_OUTPUTS`` present in ``out`` (a directory with a ``/``; an
    empty ``checkpoints/``, or one holding only an interrupted save, does not count)."""
    found = []
    for name in RUN_OUTPUTS:
        path = out / name
        if name == CHECKPOINTS and path.is_dir():
            if any(not p.name.startswith(".") for p in path.iterdir()):
                found.append(name + "/")
        elif path.exists() or path.is_symlink():
            found.append(name + ("/" if path.is_dir() else ""))
    return found


def outputs_to_replace(out: Path, resume: Path | None, overwrite: bool) -> list[str]:
    """The previous run's outputs (:func:`previous_outputs`) a run must remove before it
    writes its own: none when it resumes from a checkpoint in ``out`` (they are that
    run's, which it continues). Otherwise, like HF Trainer's ``overwrite_output_dir``,
    they are refused (TrainError naming ``--out``) unless ``overwrite``."""
    if resume is not None and _inside(resume, out):
        return []
    found = previous_outputs(out)
    if found and not overwrite:
        hint = (
            "continue that run with --resume latest, or replace them with --overwrite"
            if CHECKPOINTS + "/" in found and resume is None
            else "replace them with --overwrite, or write to another --out"
        )
        raise TrainError(f"--out {out} holds a previous run's outputs ({', '.join(found)}); {hint}")
    return found


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def _remove_outputs(out: Path, names: list[str]) -> None:
    for name in names:
        path = out / name.rstrip("/")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def make_out_dir(out: Path) -> None:
    """Create ``--out``; a failure (a race with :func:`check_paths`) is a TrainError."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainError(f"--out {out}: cannot create it ({exc.strerror or exc})") from None


def resolve_resume(resume: Path | str | None, out: Path) -> Path | None:
    """The checkpoint to resume from: ``latest`` is the newest complete one under
    ``OUT/checkpoints`` (None when there is none: a fresh start)."""
    if resume is None:
        return None
    if str(resume) == "latest":
        found = step_checkpoints(out / CHECKPOINTS)
        return found[-1] if found else None
    return Path(resume)


class _Best:
    """The best value of one metric seen so far and its step."""

    def __init__(self, name: str, greater: bool, state: dict[str, Any] | None = None) -> None:
        self.name, self.greater = name, greater
        self.value: float | None = None if not state else state.get("value")
        self.step: int | None = None if not state else state.get("step")

    def offer(self, metrics: dict[str, float], step: int) -> bool:
        value = metrics.get(self.name)
        if value is None:
            raise TrainError(f"the recipe reports no {self.name!r} to pick the best adapter by")
        better = self.value is None or (value > self.value if self.greater else value < self.value)
        if better:
            self.value, self.step = float(value), step
        return better

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.name, "value": self.value, "step": self.step}


def check_adapters(model: torch.nn.Module, options: TrainOptions) -> None:
    """What the injected model must satisfy before a step is spent: no module both adapted
    and trained whole (its saved adapter could not be applied), and with ``--export
    peft`` only modules a PEFT LoRA file can hold. (The built-in recipes' head is refused
    from the options already; this also covers other recipes and ``--targets`` regexes.)"""
    from flora.adapter.io import trained_module_names
    from flora.errors import AdapterError
    from flora.injection import adapter_layers, get_config
    from flora.interop import check_peft_exportable

    config = get_config(model)
    layers = list(adapter_layers(model))
    whole = trained_module_names(model, config.train_modules) if config is not None else []
    for name, _ in layers:
        inside = [w for w in whole if name == w or name.startswith(w + ".")]
        if inside:
            raise TrainError(
                f"--targets selects {name!r}, which the recipe trains whole "
                f"({inside[0]!r} is in train_modules): a module is either adapted or trained "
                "whole, not both"
            )
    if options.export == "peft":
        try:
            check_peft_exportable({n: layer.spec.kind for n, layer in layers}, whole)
        except AdapterError as exc:
            raise TrainError(f"--export peft: {exc}") from None


def run(task: TrainTask, options: TrainOptions) -> dict[str, Any]:
    """Train ``task`` as ``options`` say (already resolved); write the outputs; return
    the metrics that went to ``metrics.json``. The run holds ``--out``'s lock throughout
    (:func:`~flora.train.checkpoint.run_lock`)."""
    out = options.out
    make_out_dir(out)
    with run_lock(out):
        return _run_locked(task, options)


def _run_locked(task: TrainTask, options: TrainOptions) -> dict[str, Any]:
    assert options.lr is not None and options.batch_size is not None
    out = options.out
    resume = resolve_resume(options.resume, out)
    identity = run_identity(options)
    if resume is not None and not check_run(read_state(resume), identity, resume):
        _log(
            f"note: {resume} records no run (written by an older version): its options and "
            "data are not checked against this run's, only its labels and base",
            options,
        )
    replaced = outputs_to_replace(out, resume, options.overwrite)
    check_adapters(task.model, options)
    if replaced:
        _remove_outputs(out, replaced)
        _log(f"--overwrite: removed the previous run's {', '.join(replaced)}", options)
    remove_partial_checkpoints(out / CHECKPOINTS)
    model = task.model
    precision = Precision(torch.device(options.device), options.precision)
    named = trainable_parameters(model)
    if not named:
        raise TrainError("nothing to train: no parameter requires grad")
    optimizer = torch.optim.AdamW(
        param_groups(named, task.lr_scale), lr=options.lr, weight_decay=options.weight_decay
    )
    scaler = precision.scaler()
    n_train = len(task.train_examples)
    per_step = options.batch_size * options.grad_accum
    steps = total_steps(n_train, per_step, options.epochs, options.max_steps)
    examples = eval_set(task, int(options.eval_limit or 0), options.seed)
    adapter_kwargs = {
        "base_model_id": task.base_model_id,
        "task": task.task,
        "labels": task.labels,
        **task.metadata,
    }

    start_step, losses, seconds_before = 0, [], 0.0
    base_metrics: dict[str, float] = {}
    best = _Best(*task.best_metric)
    if resume is not None:
        state = load_checkpoint(resume, model, optimizer, task.labels)
        if not restore_scaler(scaler, state):
            _log(
                f"note: {resume} holds no gradient-scaler state (written by an older "
                "version or a bf16/fp32 run); fp16 continues with a fresh scaler",
                options,
            )
        start_step, losses = int(state["step"]), list(state["losses"])
        seconds_before = float(state.get("train_seconds", 0.0))
        base_metrics = dict(state.get("base_metrics", {}))
        best = _Best(*task.best_metric, state=state.get("best"))
        if start_step > steps:
            raise TrainError(
                f"--resume: checkpoint is at step {start_step}, past the {steps} asked"
            )
        _log(f"resumed from {resume} (step {start_step})", options)
    if not base_metrics:
        base_metrics = evaluate_prefixed(task, examples, "base_", precision)
        _log(f"base: {_fmt(base_metrics)}", options)

    def checkpoint(step: int, seconds: float) -> None:
        state = {
            "step": step,
            "losses": losses,
            "train_seconds": seconds,
            "base_metrics": base_metrics,
            "best": best.to_json(),
            RUN_KEY: identity,
        }
        directory = step_dir(out / CHECKPOINTS, step)
        save_checkpoint(directory, model, optimizer, state, adapter_kwargs, scaler)
        if options.keep_checkpoints:
            prune_checkpoints(out / CHECKPOINTS, options.keep_checkpoints)

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
        lr = lr_at(step, steps, options.lr, options.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        idx = batch_indices(n_train, per_step, options.seed, step)
        loss_value = _step(task, options, precision, optimizer, scaler, idx, step)
        losses.append(loss_value)
        samples += len(idx)
        elapsed = time.perf_counter() - began
        bar.set_postfix(
            loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", samples_s=f"{samples / elapsed:.1f}"
        )
        bar.update(1)
        done = step + 1
        if options.eval_every and done % options.eval_every == 0 and done < steps:
            periodic = evaluate_prefixed(task, examples, "", precision)
            if best.offer(periodic, done):
                flora.save_adapter(model, out / BEST, **adapter_kwargs)
            if options.progress:
                bar.write(f"step {done}: {_fmt(periodic)}", file=sys.stderr)
            task.train_mode(model)
        if options.save_every and done % options.save_every == 0 and done < steps:
            checkpoint(done, seconds_before + elapsed)
            task.train_mode(model)
    bar.close()
    train_seconds = seconds_before + (time.perf_counter() - began)

    flora.save_adapter(model, out, **adapter_kwargs)
    eval_metrics = evaluate_prefixed(task, examples, "", precision)
    _log(f"adapter: {_fmt(eval_metrics)}", options)
    if options.eval_every and best.offer(eval_metrics, steps):
        flora.save_adapter(model, out / BEST, **adapter_kwargs)
    checkpoint(steps, train_seconds)
    if options.export == "peft":
        _export_peft(out)
    extra = {}
    if task.extra_metrics:
        with precision.autocast():
            extra = task.extra_metrics(examples)
    metrics: dict[str, Any] = {
        **eval_metrics,
        **base_metrics,
        **extra,
        # every eval_* metric above was computed on these examples
        "eval_examples": len(examples),
        "eval_pool": len(task.eval_examples),
        "eval_sampling": "all"
        if len(examples) == len(task.eval_examples)
        else f"{'stratified ' if task.eval_key else ''}random, seed {options.seed}",
        "trainable_params": sum(p.numel() for _, p in named),
        "train_seconds": round(train_seconds, 2),
        "steps": steps,
        "train_examples": n_train,
        "final_loss": _tail_mean(losses),
        "task": task.task,
        "labels": task.labels,
        "device": options.device,
        "precision": options.precision,
        "options": options.to_json(),
    }
    if options.eval_every:
        metrics["best"] = best.to_json()
    (out / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    if losses:
        plot_loss(losses, out / LOSS_PNG, f"{options.recipe}: {options.base} on {options.data}")
    return metrics


def _step(
    task: TrainTask,
    options: TrainOptions,
    precision: Precision,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    idx: list[int],
    step: int,
) -> float:
    """One optimizer step over ``idx``, in micro-batches of ``batch_size``; each
    micro-batch's mean loss is weighted by its share of the examples, so the gradient is
    that of the mean over ``idx``. Returns that mean loss."""
    device = torch.device(options.device)
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    size = options.batch_size
    assert size is not None
    for start in range(0, len(idx), size):
        chunk = idx[start : start + size]
        batch = to_device(task.collate([task.train_examples[i] for i in chunk]), device)
        with precision.autocast():
            loss = task.loss(task.model, batch)
        value = float(loss.item())
        if not math.isfinite(value):
            raise TrainError(f"loss became {value} at step {step}; lower --lr")
        weight = len(chunk) / len(idx)
        scaler.scale(loss.float() * weight).backward()
        total += value * weight
    if options.max_grad_norm:
        scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    return total


def _export_peft(out: Path) -> None:
    from flora.errors import AdapterError
    from flora.interop import to_peft

    try:
        to_peft(flora.load_adapter(out), out / PEFT_DIR)
    except AdapterError as exc:
        raise TrainError(f"--export peft: {exc}") from None


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
