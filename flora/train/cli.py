"""``flora-train RECIPE --base NAME|PATH --data SPEC --out DIR [options]``.

Exit codes: 0 done, 2 bad usage or bad data (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from flora.train.errors import TrainError

RECIPES = ("causal-lm", "text-classification", "image-classification")
EPILOG = """data specs:
  builtin:mnist5k | builtin:chatterbot-topics | builtin:synthetic-instruct
  FILE.csv / FILE.jsonl (text,label | path,label | messages / prompt,completion)
  DIR (image-classification: one sub-folder per class)
"""


def _targets(value: str) -> list[str] | str:
    # "q_proj,v_proj" -> suffix list; a value with regex characters stays one regex.
    if any(c in value for c in "()[]|*+?\\^$"):
        return value
    return [v for v in value.split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (public so docs and tests can inspect it)."""
    p = argparse.ArgumentParser(
        prog="flora-train",
        description="Train a FLoRA adapter.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", choices=RECIPES)
    p.add_argument("--base", required=True, help="embedded model name or HF directory")
    p.add_argument("--data", required=True, help="builtin:NAME, a file or a folder")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--rank", type=int, default=8, help="rank of channel/feature modes")
    p.add_argument("--kernel-rank", type=int, help="rank of conv kernel modes (default: full)")
    p.add_argument("--scale", type=float, help="adapter multiplier s")
    p.add_argument("--targets", type=_targets, help="comma-separated module suffixes, or a regex")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-steps", type=int, help="steps to run (overrides --epochs)")
    p.add_argument("--epochs", type=float)
    p.add_argument("--eval-split", help="fraction of the data held out (0.1) or an eval file")
    p.add_argument("--eval-limit", type=int, help="evaluate on at most N examples (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", type=Path, help="checkpoint directory (OUT/checkpoints/step-N)")
    p.add_argument("--image-size", type=int, help="image-classification input size")
    p.add_argument("--max-length", type=int, default=256, help="max tokens per text example")
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of the steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is best on a busy CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flora-train`` console script."""
    args = build_parser().parse_args(argv)
    from flora.train.api import train

    kwargs = {
        k: getattr(args, k)
        for k in (
            "rank",
            "kernel_rank",
            "scale",
            "targets",
            "lr",
            "batch_size",
            "max_steps",
            "epochs",
            "eval_split",
            "eval_limit",
            "seed",
            "resume",
            "image_size",
            "max_length",
            "warmup",
            "weight_decay",
            "save_every",
            "threads",
        )
    }
    try:
        metrics = train(
            args.recipe,
            base=args.base,
            data=args.data,
            out=args.out,
            progress=not args.quiet,
            **kwargs,
        )
    except TrainError as exc:
        print(f"flora-train: error: {exc}", file=sys.stderr)
        return 2
    keys = [k for k in metrics if k.endswith(("accuracy", "exact_match"))]
    summary = ", ".join(f"{k}={metrics[k]:.4f}" for k in keys)
    print(
        f"wrote {args.out}: {summary}, trainable_params={metrics['trainable_params']}, "
        f"train_seconds={metrics['train_seconds']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
