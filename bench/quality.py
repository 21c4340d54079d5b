"""Adapter quality and training cost: FLoRA vs PEFT LoRA vs PEFT LoHa, 3 seeds each.

Every method trains through the same flora-train recipe (data, head, collate, loss,
evaluation, learning rate, batches, steps); only the injection differs (the recipe's
``inject`` is swapped for PEFT's ``inject_adapter_in_model`` on the same target modules,
with the rank that brings the trainable-parameter count closest to FLoRA's). Accuracy is
on each task's full eval set (mnist5k: all 1,000 test digits). Seconds per training step
(forward, backward, optimizer; collation excluded) are measured in the same process, the
methods interleaved per seed, so ``train_step_ratio_vs_lora`` (FLoRA / LoRA, median step
time) is a side-by-side ratio on a shared, noisy machine.

Tasks: EfficientNet-Lite0 on builtin:mnist5k (FLoRA's conv-kernel rank varied), on
scikit-learn's bundled 8x8 digits (written as an image folder), MiniLM-L6 on
builtin:chatterbot-topics (with the linear probe on the same eval set), SmolLM2-135M on
builtin:synthetic-instruct.

    python -m bench.quality --quick   # bench/results/quality_quick.json (+ .png)
    python -m bench.quality           # bench/results/quality.json (+ .png)

Run it as a module from the repository root: as a file, its folder would go first on the
import path and ``bench/kernels.py`` would shadow the ``kernels`` package transformers
imports.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn

import flora
from bench.peft_baselines import peft_count, peft_inject
from flora.models import load
from flora.train.loop import param_groups, trainable_parameters
from flora.train.options import TrainOptions
from flora.train.recipe import TrainTask
from flora.train.recipes import default_recipes
from flora.train.schedule import batch_indices, lr_at

RECIPE_MODULES = (
    "flora.train.image_classification",
    "flora.train.text_classification",
    "flora.train.causal_lm",
)
METHODS = ("flora", "lora", "loha")


@dataclass
class TaskSpec:
    """One benchmark task: a recipe run with fixed options."""

    name: str
    recipe: str
    base: str
    data: str
    metric: str
    steps: int
    options: dict[str, Any] = field(default_factory=dict)
    kernel_ranks: tuple[int | None, ...] = (None,)
    targets: Callable[[nn.Module], list[str]] | None = None


def pointwise_and_full_convs(model: nn.Module) -> list[str]:
    """Every Conv2d PEFT's LoRA can adapt (groups == 1: it cannot take depthwise convs)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]


def tasks(quick: bool, digits_dir: str) -> list[TaskSpec]:
    q = quick
    return [
        TaskSpec(
            "mnist5k-efficientnet",
            "image-classification",
            "efficientnet-lite0",
            "builtin:mnist5k",
            "eval_accuracy",
            steps=40 if q else 150,
            options={"lr": 2e-3, "batch_size": 32, "image_size": 32 if q else 64},
            kernel_ranks=(None, 1) if q else (None, 2, 1),
            targets=pointwise_and_full_convs,
        ),
        TaskSpec(
            "sklearn-digits-efficientnet",
            "image-classification",
            "efficientnet-lite0",
            digits_dir,
            "eval_accuracy",
            steps=30 if q else 100,
            options={"lr": 2e-3, "batch_size": 32, "image_size": 32, "eval_split": "0.2"},
            targets=pointwise_and_full_convs,
        ),
        TaskSpec(
            "chatterbot-topics-minilm",
            "text-classification",
            "minilm-l6",
            "builtin:chatterbot-topics",
            "eval_accuracy",
            # full: the recipe's default, 3 epochs of the 1,508 training texts at batch 16
            steps=60 if q else 285,
            options={"batch_size": 16, "max_length": 64},
        ),
        TaskSpec(
            "synthetic-instruct-smollm2",
            "causal-lm",
            "smollm2-135m-instruct",
            "builtin:synthetic-instruct",
            "eval_exact_match",
            steps=10 if q else 60,
            options={"batch_size": 4, "eval_limit": 8 if q else 100},
        ),
    ]


def write_digits(root: Path) -> str:
    """scikit-learn's bundled 8x8 digits (1,797) as an image folder, one sub-folder per
    class (the image-folder input of flora-train)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        d = root / str(int(label))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((pixels * 255 / 16).astype(np.uint8), mode="L").save(d / f"{i}.png")
    return str(root)


# -- parameter matching ------------------------------------------------------------------


# -- one run -----------------------------------------------------------------------------


def prepare(spec: TaskSpec, seed: int, kernel_rank: int | None, inject: Any = None) -> TrainTask:
    recipe = default_recipes().get(spec.recipe)
    assert recipe is not None
    loaded = load(spec.base)
    opts = dict(spec.options)
    if spec.targets is not None:
        opts["targets"] = spec.targets(loaded.model)
    options = TrainOptions(
        recipe=spec.recipe,
        base=spec.base,
        data=spec.data,
        out=Path("unused"),
        seed=seed,
        kernel_rank=kernel_rank,
        device="cpu",
        progress=False,
        max_steps=spec.steps,
        eval_limit=opts.pop("eval_limit", 0),
        **opts,
    ).resolved(recipe.defaults)
    torch.manual_seed(seed)
    with ExitStack() as stack:
        if inject is not None:
            for module in RECIPE_MODULES:
                stack.enter_context(mock.patch(f"{module}.inject", inject))
        task = recipe.prepare(options, loaded)
    task.options = options  # type: ignore[attr-defined]
    return task


def adapter_params(task: TrainTask) -> int:
    """Trainable parameters outside the recipe's new head."""
    return sum(p.numel() for n, p in trainable_parameters(task.model) if "classifier" not in n)


def run(task: TrainTask, probe: bool = True) -> dict[str, Any]:
    """Train with the recipe's optimizer settings; step times and eval metrics (the linear
    probe only when ``probe``: it switches FLoRA's adapters off, not PEFT's)."""
    options: TrainOptions = task.options  # type: ignore[attr-defined]
    assert options.lr is not None and options.batch_size is not None
    model = task.model
    named = trainable_parameters(model)
    optimizer = torch.optim.AdamW(param_groups(named, task.lr_scale), lr=options.lr)
    steps = int(options.max_steps or 1)
    task.train_mode(model)
    times, losses = [], []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, options.lr, options.warmup) * group["lr_scale"]
        idx = batch_indices(len(task.train_examples), options.batch_size, options.seed, step)
        batch = task.collate([task.train_examples[i] for i in idx])
        began = time.perf_counter()
        loss = task.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - began)
        losses.append(loss.item())
    model.eval()
    from flora.train.data import stratified_sample

    examples = stratified_sample(
        task.eval_examples, int(options.eval_limit or 0), task.eval_key, options.seed
    )
    with torch.inference_mode():
        metrics = task.evaluate(model, examples)
    if probe and task.extra_metrics is not None:
        metrics.update(task.extra_metrics(examples))
    return {
        **metrics,
        "eval_examples": len(examples),
        "trainable_params": sum(p.numel() for _, p in named),
        "step_seconds_median": statistics.median(times[2:] or times),
        "final_loss": sum(losses[-5:]) / len(losses[-5:]),
    }


def study(
    spec: TaskSpec,
    seeds: list[int],
    log: Callable[[str], None],
    methods: tuple[str, ...] = METHODS,
) -> dict[str, Any]:
    """Every method (and FLoRA kernel rank) over ``seeds``, interleaved per seed."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for seed in seeds:
        for kr in spec.kernel_ranks:
            flora_task = prepare(spec, seed, kr)
            n_flora = adapter_params(flora_task)
            key = "flora" if kr is None else f"flora_kernel_rank_{kr}"
            result = run(flora_task)
            runs.setdefault(key, []).append({"seed": seed, **result})
            log(f"{spec.name} seed {seed} {key}: {_short(result, spec.metric)}")
            if kr is not None:
                continue
            for method in [m for m in methods if m != "flora"]:
                task = prepare(spec, seed, None, inject=peft_inject(method, n_flora))
                result = run(task, probe=False)
                result["rank"] = task.model.peft_rank
                runs.setdefault(method, []).append({"seed": seed, **result})
                log(f"{spec.name} seed {seed} {method}: {_short(result, spec.metric)}")
    summary = {name: _summarise(rs, spec.metric) for name, rs in runs.items()}
    ratio = (
        summary["flora"]["step_seconds"] / summary["lora"]["step_seconds"]
        if "lora" in summary
        else None
    )
    return {
        "task": spec.name,
        "base": spec.base,
        "data": spec.data if not spec.data.startswith("/") else "sklearn digits (image folder)",
        "metric": spec.metric,
        "steps": spec.steps,
        "options": spec.options,
        "train_step_ratio_vs_lora": None if ratio is None else round(ratio, 3),
        "summary": summary,
        "runs": runs,
    }


def paired_step_ratio(spec: TaskSpec, steps: int, seed: int = 0) -> dict[str, Any]:
    """FLoRA and PEFT LoRA models of ``spec`` trained step by step in alternation on the
    same batches: the median of the paired steps' time ratios (FLoRA / LoRA), robust to a
    shared machine's load changing during the run."""
    f_task = prepare(spec, seed, None)
    l_task = prepare(spec, seed, None, inject=peft_inject("lora", adapter_params(f_task)))
    opts: TrainOptions = f_task.options  # type: ignore[attr-defined]
    assert opts.lr is not None and opts.batch_size is not None
    pairs = []
    optims = {}
    for name, task in (("flora", f_task), ("lora", l_task)):
        named = trainable_parameters(task.model)
        optims[name] = torch.optim.AdamW(param_groups(named, task.lr_scale), lr=opts.lr)
        task.train_mode(task.model)
    for step in range(steps):
        idx = batch_indices(len(f_task.train_examples), opts.batch_size, opts.seed, step)
        batch = f_task.collate([f_task.train_examples[i] for i in idx])
        took = {}
        for name, task in (("flora", f_task), ("lora", l_task)):
            began = time.perf_counter()
            loss = task.loss(task.model, batch)
            optims[name].zero_grad(set_to_none=True)
            loss.backward()
            optims[name].step()
            took[name] = time.perf_counter() - began
        if step >= 2:
            pairs.append(took["flora"] / took["lora"])
    return {
        "task": spec.name,
        "steps": steps,
        "ratio_median": round(statistics.median(pairs), 3),
        "ratio_quartiles": [round(q, 3) for q in statistics.quantiles(pairs, n=4)],
    }


def _summarise(runs: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    values = [r[metric] for r in runs]
    out = {
        "mean": round(statistics.mean(values), 4),
        "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
        "n_seeds": len(values),
        "trainable_params": runs[0]["trainable_params"],
        "step_seconds": round(statistics.median(r["step_seconds_median"] for r in runs), 4),
    }
    if "linear_probe_eval_accuracy" in runs[0]:
        probe = [r["linear_probe_eval_accuracy"] for r in runs]
        out["linear_probe_mean"] = round(statistics.mean(probe), 4)
    if "eval_loss" in runs[0]:
        out["eval_loss_mean"] = round(statistics.mean(r["eval_loss"] for r in runs), 4)
    return out


def _short(result: dict[str, Any], metric: str) -> str:
    probe = result.get("linear_probe_eval_accuracy")
    return (
        f"{metric}={result[metric]:.4f} params={result['trainable_params']} "
        f"step={result['step_seconds_median']:.3f}s"
        + ("" if probe is None else f" linear_probe={probe:.4f}")
    )


LAYER_CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    # EfficientNet-Lite0-like shapes at 32 px, batch 32; MiniLM-like linear, 16 x 64 tokens
    "conv1x1": (lambda: nn.Conv2d(96, 24, 1), (32, 96, 8, 8)),
    "conv1x1_wide": (lambda: nn.Conv2d(320, 1280, 1), (32, 320, 1, 1)),
    "conv3x3_stem": (lambda: nn.Conv2d(3, 32, 3, stride=2, padding=1), (32, 3, 32, 32)),
    "conv3x3": (lambda: nn.Conv2d(64, 64, 3, padding=1), (32, 64, 8, 8)),
    "linear": (lambda: nn.Linear(384, 384), (16, 64, 384)),
}


def layer_profile(repeats: int) -> dict[str, Any]:
    """Forward + backward (adapter parameters' gradients) of one adapted layer: FLoRA
    rank 8 vs PEFT LoRA at the rank closest in parameters; median seconds, interleaved."""
    from peft import LoraConfig, inject_adapter_in_model

    out = {}
    for kind, (make, shape) in LAYER_CASES.items():
        torch.manual_seed(0)
        f_model = nn.Sequential(make())
        flora.inject(f_model, flora.FloraConfig(["0"], rank=8))
        n_flora = sum(p.numel() for p in f_model.parameters() if p.requires_grad)
        l_model = nn.Sequential(make())
        rank = min(range(1, 65), key=lambda r: abs(peft_count(l_model, ["0"], r, "lora") - n_flora))
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=["0"]), l_model)
        x = torch.randn(shape)
        times: dict[str, list[float]] = {"flora": [], "lora": []}
        for i in range(repeats + 3):
            for name, model in (("flora", f_model), ("lora", l_model)):
                began = time.perf_counter()
                model(x).square().mean().backward()
                if i >= 3:
                    times[name].append(time.perf_counter() - began)
                model.zero_grad(set_to_none=True)
        f, lo = statistics.median(times["flora"]), statistics.median(times["lora"])
        # each FLoRA call is paired with the LoRA call right after it: the median of the
        # pairs' ratios is robust to the load of a shared machine changing between calls
        pairs = zip(times["flora"], times["lora"], strict=True)
        paired = statistics.median(a / b for a, b in pairs)
        out[kind] = {
            "flora_path": getattr(f_model[0], "path", "linear"),
            "flora_params": n_flora,
            "lora_rank": rank,
            "lora_params": sum(p.numel() for p in l_model.parameters() if p.requires_grad),
            "flora_ms": round(f * 1e3, 3),
            "lora_ms": round(lo * 1e3, 3),
            "ratio": round(paired, 3),
        }
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    """One panel per task: mean +- std of each method's metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = report["tasks"]
    fig, axes = plt.subplots(1, len(items), figsize=(4.2 * len(items), 3.6), dpi=100)
    for ax, item in zip(list(axes) if len(items) > 1 else [axes], items, strict=True):
        names = list(item["summary"])
        means = [item["summary"][n]["mean"] for n in names]
        stds = [item["summary"][n]["std"] for n in names]
        ax.bar(range(len(names)), means, yerr=stds, capsize=4, color="#4a7ab5")
        ax.set_xticks(
            range(len(names)),
            [n.replace("flora_kernel_rank_", "flora kr=") for n in names],
            rotation=30,
            fontsize=8,
        )
        ax.set_title(f"{item['task']}\n{item['metric']}", fontsize=9)
        ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer steps (under 15 min, 2 cores)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--tasks", help="comma-separated task names (default: all)")
    p.add_argument("--threads", type=int, default=1, help="1 is fastest on a busy CPU")
    p.add_argument("--out", type=Path)
    p.add_argument("--layers-only", action="store_true", help="only the per-layer profile")
    p.add_argument("--methods", default=",".join(METHODS), help="subset of flora,lora,loha")
    p.add_argument("--ratio-only", action="store_true", help="only the paired step ratio")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    layers = layer_profile(repeats=20 if args.quick else 100)
    print(json.dumps(layers, indent=2), flush=True)
    if args.layers_only:
        return
    out = args.out or Path(
        "bench/results/quality_quick.json" if args.quick else "bench/results/quality.json"
    )
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        specs = tasks(args.quick, write_digits(Path(tmp) / "digits"))
        if args.tasks:
            wanted = set(args.tasks.split(","))
            specs = [s for s in specs if s.name in wanted]
        paired = [paired_step_ratio(s, 12 if args.quick else 40) for s in specs[:2]]
        print(json.dumps(paired, indent=2), flush=True)
        if args.ratio_only:
            return
        methods = tuple(m for m in args.methods.split(",") if m)
        results = [
            study(s, list(range(args.seeds)), lambda m: print(m, flush=True), methods)
            for s in specs
        ]
    conv = next((r for r in results if r["task"].startswith("mnist5k")), results[0])
    report = {
        "quick": args.quick,
        "seeds": args.seeds,
        "threads": args.threads,
        # FLoRA / LoRA step time, the median of paired steps on the conv task
        "train_step_ratio_vs_lora": paired[0]["ratio_median"],
        "paired_step_ratio": paired,
        "train_step_ratio_of_run_medians": conv["train_step_ratio_vs_lora"],
        "train_step_ratio_vs_lora_task": conv["task"],
        "train_step_ratio_vs_lora_by_task": {
            r["task"]: r["train_step_ratio_vs_lora"] for r in results
        },
        "goal_train_step_ratio": 1.2,
        "layer_step_ratio_vs_lora": layers,
        "wall_seconds": round(time.perf_counter() - began, 1),
        "tasks": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in report.items() if k != "tasks"}, indent=2))


if __name__ == "__main__":
    main()
