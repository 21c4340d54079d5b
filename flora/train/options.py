"""TrainOptions: everything one training run is asked to do (the CLI flags, as data)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flora.train.errors import TrainError


@dataclass
class RecipeDefaults:
    """Per-recipe defaults for the options a user leaves unset (``None``)."""

    targets: list[str] | str
    lr: float
    batch_size: int
    epochs: float = 1.0
    scale: float = 1.0
    eval_limit: int = 200


@dataclass
class TrainOptions:
    """One training run. ``None`` means "the recipe's default" (see ``RecipeDefaults``)."""

    recipe: str
    base: str
    data: str
    out: Path
    rank: int = 8
    kernel_rank: int | None = None
    scale: float | None = None
    targets: list[str] | str | None = None
    lr: float | None = None
    batch_size: int | None = None
    max_steps: int | None = None
    epochs: float | None = None
    eval_split: str | None = None
    """A fraction of the data held out for eval (``0.1``) or the spec of an eval file."""
    eval_limit: int | None = None
    """Evaluate on at most this many eval examples (0 = all)."""
    seed: int = 0
    resume: Path | str | None = None
    """A checkpoint directory, or ``latest``: the newest under ``OUT/checkpoints`` (a fresh
    start when there is none yet)."""
    image_size: int | None = None
    max_length: int = 256
    warmup: float = 0.05
    """Fraction of the steps with a linear learning-rate warm-up (then cosine decay)."""
    weight_decay: float = 0.0
    save_every: int = 0
    """Write a checkpoint every N steps (0: only the final one)."""
    threads: int | None = None
    """torch CPU threads (None: torch's default). On a shared, busy CPU, 1 thread avoids
    oversubscription and can be several times faster."""
    device: str = "auto"
    """``auto`` (CUDA, else MPS, else CPU), ``cpu``, ``cuda[:N]`` or ``mps``."""
    precision: str = "fp32"
    """``fp32``, ``bf16`` or ``fp16`` (autocast; fp16 with a gradient scaler)."""
    grad_accum: int = 1
    """Micro-batches of ``batch_size`` per optimizer step (effective batch = product)."""
    max_grad_norm: float | None = None
    """Clip the global gradient norm to this value (None: no clipping)."""
    eval_every: int = 0
    """Evaluate every N steps and keep the best adapter in ``OUT/best`` (0: off)."""
    keep_checkpoints: int | None = None
    """Keep only the K newest step checkpoints (None: keep all)."""
    export: str | None = None
    """``peft``: also write the adapter as PEFT LoRA to ``OUT/peft`` (linear adapters)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Column mapping for file and ``datasets`` inputs: role (text, label, image, path,
    messages, prompt, completion) -> the column that holds it."""
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.resume is not None and str(self.resume) != "latest":
            self.resume = Path(self.resume)
        for name in ("rank", "batch_size", "max_steps", "threads", "grad_accum"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.kernel_rank is not None and self.kernel_rank < 1:
            raise TrainError(f"--kernel-rank must be >= 1, got {self.kernel_rank}")
        if self.lr is not None and not self.lr > 0:
            raise TrainError(f"--lr must be > 0, got {self.lr}")
        if self.epochs is not None and not self.epochs > 0:
            raise TrainError(f"--epochs must be > 0, got {self.epochs}")
        if self.eval_limit is not None and self.eval_limit < 0:
            raise TrainError(f"--eval-limit must be >= 0, got {self.eval_limit}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise TrainError(f"--max-grad-norm must be > 0, got {self.max_grad_norm}")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise TrainError(f"--{name.replace('_', '-')} must be >= 0")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise TrainError(f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.export not in (None, "peft"):
            raise TrainError(f"--export: unknown format {self.export!r}; use peft")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise TrainError(f"--precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise TrainError(f"--warmup must be in [0, 1), got {self.warmup}")

    def resolved(self, defaults: RecipeDefaults) -> TrainOptions:
        """A copy with every ``None`` option replaced by the recipe default."""
        data = asdict(self)
        for key in ("targets", "lr", "batch_size", "scale", "eval_limit"):
            if data[key] is None:
                data[key] = getattr(defaults, key)
        if data["epochs"] is None and data["max_steps"] is None:
            data["epochs"] = defaults.epochs
        return TrainOptions(**data)

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (paths as strings), recorded in metrics.json."""
        data = asdict(self)
        data["out"] = str(self.out)
        data["resume"] = None if self.resume is None else str(self.resume)
        data.pop("progress")
        return data
