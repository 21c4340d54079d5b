"""``flora-train RECIPE --base NAME|PATH --data SPEC --out DIR [options]``.

Exit codes: 0 done, 2 bad usage, a bad option or bad data (one line on stderr, no
traceback; options are checked before the base model or the data is loaded). Any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from flora.train.errors import TrainError

RECIPES = ("causal-lm", "text-classification", "image-classification")
EPILOG = """data specs:
  builtin:mnist5k | builtin:chatterbot-topics | builtin:synthetic-instruct
  FILE.csv / FILE.jsonl / FILE.json (JSON array) with text,label | path,label |
    messages / prompt,completion (other column names: --text-column ...)
  FILE.parquet / a datasets save_to_disk DIR (needs the `datasets` extra; a DatasetDict's
    validation or test split is the eval set unless --eval-split says otherwise)
  DIR (image-classification: one sub-folder per class)
"""
COLUMN_ROLES = ("text", "label", "image", "path", "messages", "prompt", "completion")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the epilog's layout and shows every option's default."""


def _targets(value: str) -> list[str] | str:
    # "q_proj,v_proj" -> suffix list; a value with regex characters stays one regex.
    if any(c in value for c in "()[]|*+?\\^$"):
        return value
    return [v for v in value.split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (public so docs and tests can inspect it)."""
    p = argparse.ArgumentParser(
        prog="flora-train",
        description="Train a FLoRA adapter. Options shown with default None take the "
        "recipe's default.",
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
    )
    p.add_argument("recipe", choices=RECIPES)
    p.add_argument("--base", required=True, help="embedded model name or HF directory")
    p.add_argument("--data", required=True, help="builtin:NAME, a file or a folder")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--rank", type=int, default=8, help="rank of channel/feature modes")
    p.add_argument("--kernel-rank", type=int, help="rank of conv kernel modes (None: full)")
    p.add_argument("--scale", type=float, help="adapter multiplier s (finite, not 0)")
    p.add_argument("--targets", type=_targets, help="comma-separated module suffixes, or a regex")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--batch-size", type=int, help="examples per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--max-grad-norm", type=float, help="clip the gradient norm (None: off)")
    p.add_argument("--max-steps", type=int, help="optimizer steps to run (overrides --epochs)")
    p.add_argument("--epochs", type=float)
    p.add_argument(
        "--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda[:N], mps"
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="autocast precision; adapters are saved in float32 either way",
    )
    p.add_argument("--eval-split", help="fraction of the data held out (0.1) or an eval file")
    p.add_argument(
        "--eval-limit",
        type=int,
        help="evaluate on a seeded, stratified sample of N eval examples (0 = all)",
    )
    p.add_argument(
        "--eval-every", type=int, default=0, help="evaluate every N steps, best adapter -> OUT/best"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", help="checkpoint directory, or 'latest' (newest in OUT/checkpoints)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="a run that starts afresh replaces a previous run's outputs in --out "
        "(without it such an --out is refused)",
    )
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps")
    p.add_argument("--keep-checkpoints", type=int, help="keep only the K newest checkpoints")
    p.add_argument(
        "--image-size",
        type=int,
        help="image-classification input size in px (None: the dataset's hint, else the base's)",
    )
    p.add_argument("--max-length", type=int, default=256, help="max tokens per text example")
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of the steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    for role in COLUMN_ROLES:
        p.add_argument(f"--{role}-column", help=f"the data column holding '{role}'")
    p.add_argument("--export", choices=("peft",), help="also write OUT/peft (linear adapters)")
    p.add_argument("--push", metavar="URL", help="upload the adapter to this flora-serve")
    p.add_argument("--adapter-id", help="the id to upload under (with --push)")
    p.add_argument("--api-key", help="admin API key for --push (default: $FLORA_API_KEY)")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is best on a busy CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flora-train`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.push and not args.adapter_id:
        parser.error("--push needs --adapter-id")
    from flora.train.api import train
    from flora.train.options import TrainOptions

    # Every option the parser names as its TrainOptions field (the rest are set below).
    kwargs = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainOptions)
        if f.name not in ("recipe", "base", "data", "out", "columns", "progress", "extra")
    }
    kwargs["columns"] = {
        role: getattr(args, f"{role}_column")
        for role in COLUMN_ROLES
        if getattr(args, f"{role}_column")
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
        pushed = ""
        if args.push:
            from flora.train.push import push_adapter

            status = push_adapter(args.out, args.push, args.adapter_id, args.api_key)
            pushed = f"; pushed to {args.push} as {args.adapter_id} ({status})"
    except TrainError as exc:
        print(f"flora-train: error: {exc}", file=sys.stderr)
        return 2
    keys = [k for k in metrics if k.endswith(("accuracy", "exact_match"))]
    summary = ", ".join(f"{k}={metrics[k]:.4f}" for k in keys)
    print(
        f"wrote {args.out}: {summary} (on {metrics['eval_examples']} eval examples), "
        f"trainable_params={metrics['trainable_params']}, "
        f"train_seconds={metrics['train_seconds']}{pushed}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
