"""flora-train on a GPU: the mnist5k adapter (EfficientNet-Lite0) on CUDA in bf16.

Trains with ``flora.train.train`` (autocast bf16, float32 adapter), evaluates on all 1,000
held-out digits, and writes time and accuracy as JSON. Meant to take well under 8 minutes
on one CUDA GPU; ``--device cpu --max-steps 2`` is the smoke path that runs anywhere.

    python bench/train_gpu.py                                  # bench/results/train_gpu.json
    python bench/train_gpu.py --device cpu --max-steps 2 --eval-limit 20 --out /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from flora.train import train


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--max-steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--eval-limit", type=int, default=0, help="0: all 1,000 held-out digits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/results/train_gpu.json"))
    args = p.parse_args()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        metrics = train(
            "image-classification",
            base="efficientnet-lite0",
            data="builtin:mnist5k",
            out=Path(tmp) / "mnist",
            device=args.device,
            precision=args.precision,
            max_steps=args.max_steps,
            batch_size=args.batch_size,
            lr=args.lr,
            image_size=args.image_size,
            eval_limit=args.eval_limit,
            seed=args.seed,
            progress=True,
        )
    wall = time.perf_counter() - began
    device_name = (
        torch.cuda.get_device_name(torch.device(metrics["device"]))
        if metrics["device"].startswith("cuda")
        else platform.processor() or "cpu"
    )
    report = {
        "task": "efficientnet-lite0 + builtin:mnist5k, image-classification recipe",
        "device": metrics["device"],
        "device_name": device_name,
        "precision": metrics["precision"],
        "torch": torch.__version__,
        "steps": metrics["steps"],
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "eval_accuracy": metrics["eval_accuracy"],
        "eval_examples": metrics["eval_examples"],
        "base_eval_accuracy": metrics["base_eval_accuracy"],
        "train_seconds": metrics["train_seconds"],
        "wall_seconds": round(wall, 1),
        "trainable_params": metrics["trainable_params"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
