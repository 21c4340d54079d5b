"""FLoRA vs LoRA (the real ``peft`` package) on EfficientNet-Lite0 + builtin:mnist5k.

Both runs adapt the same convolutions (stem, expand, project, head: PEFT's conv LoRA
cannot adapt the 16 depthwise convs, it needs the rank divisible by groups), train a new
10-class head fully, and share everything else: head initialisation, batches, steps,
learning-rate schedule, image size, batch-norm frozen. The LoRA rank is chosen so the
trainable-parameter counts are as close as possible. Ratios and accuracies are measured
side by side in one process (the machine is shared and noisy).

    nice -n 10 python bench/flora_vs_lora.py --steps 150 --out bench/results/flora_vs_lora.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

import flora
from flora.models import load
from flora.train.builtin import load_mnist5k
from flora.train.data import encode_labels
from flora.train.heads import accuracy, freeze_batchnorm, replace_head
from flora.train.schedule import batch_indices, lr_at


def conv_targets(model: nn.Module) -> list[str]:
    """Every Conv2d that PEFT LoRA can adapt (groups == 1)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]


def lora_params(model: nn.Module, targets: list[str], r: int) -> int:
    """Trainable parameters of PEFT conv LoRA with rank r: r*(in*k*k) + out*r per conv."""
    total = 0
    for name in targets:
        conv = model.get_submodule(name)
        k = conv.kernel_size[0] * conv.kernel_size[1]
        total += r * conv.in_channels * k + conv.out_channels * r
    return total


def build(method: str, rank: int, seed: int) -> tuple[nn.Module, int]:
    """Fresh base + seeded 10-class head + adapters; returns (model, trainable params)."""
    model = load("efficientnet-lite0").model
    torch.manual_seed(seed)
    replace_head(model, 10)
    targets = conv_targets(model)
    if method == "flora":
        flora.inject(model, flora.FloraConfig(targets, rank=rank, train_modules=["classifier"]))
    else:
        cfg = LoraConfig(
            r=rank,
            lora_alpha=rank,
            target_modules=targets,
            modules_to_save=["classifier"],
            init_lora_weights=True,
        )
        model = get_peft_model(model, cfg)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, n


def run(method: str, rank: int, args: argparse.Namespace, data) -> dict:
    model, n_params = build(method, rank, args.seed)
    train, test, transform = data
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    losses = []
    began = time.perf_counter()
    freeze_batchnorm(model)
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, 0.05)
        idx = batch_indices(len(train), args.batch_size, args.seed, step)
        x = transform.batch([train[i][0] for i in idx])
        y = torch.tensor([train[i][1] for i in idx])
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 25 == 0:
            print(f"{method} step {step} loss {loss.item():.4f}", flush=True)
    seconds = time.perf_counter() - began
    model.eval()
    with torch.inference_mode():
        logits = torch.cat(
            [
                model(transform.batch([im for im, _ in test[i : i + 100]]))
                for i in range(0, len(test), 100)
            ]
        )
    acc = accuracy(logits, torch.tensor([y for _, y in test]))
    return {
        "method": method,
        "rank": rank,
        "trainable_params": n_params,
        "test_accuracy": acc,
        "train_seconds": round(seconds, 1),
        "final_loss": sum(losses[-20:]) / 20,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--rank", type=int, default=8, help="FLoRA rank")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("bench/results/flora_vs_lora.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    splits = load_mnist5k(0)
    train, test, _ = encode_labels(splits.train, splits.eval or [], "builtin:mnist5k")
    transform = load("efficientnet-lite0").preprocessor.with_size(args.image_size)
    data = (train, test, transform)

    _, flora_n = build("flora", args.rank, args.seed)
    base = load("efficientnet-lite0").model
    targets = conv_targets(base)
    head = 1280 * 10 + 10
    lora_rank = min(range(1, 65), key=lambda r: abs(lora_params(base, targets, r) + head - flora_n))
    results = [run("flora", args.rank, args, data), run("lora", lora_rank, args, data)]
    report = {
        "task": "efficientnet-lite0 + builtin:mnist5k (1,000 test digits)",
        "targets": f"{len(targets)} non-depthwise Conv2d + new head",
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "image_size": args.image_size,
        "seed": args.seed,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
