"""TrainOptions: everything one training run is asked to do (the CLI flags, as data)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flora.config import FloraConfig
from flora.train.data import parse_eval_split
from flora.train.errors import TrainError

# Integer options that count something (>= 1), or that may be 0 (>= 0), and float options
# that must be > 0; all of them may be None (the recipe default, or "off").
_AT_LEAST_ONE = (
    "batch_size",
    "max_steps",
    "threads",
    "grad_accum",
    "keep_checkpoints",
    "image_size",
    "max_length",
)
_AT_LEAST_ZERO = ("eval_limit", "eval_every", "save_every")
_POSITIVE = ("lr", "epochs", "max_grad_norm")
# Options a resumed run may change: where it runs and writes (the device, threads,
# progress, output, checkpoint cadence, export, overwrite), what is compared otherwise (the
# data and an eval file by content, ``checkpoint.run_identity``; the base by its
# fingerprint), and ``extra`` (a recipe's own options, not compared). Every other option
# changes the adapter, the schedule, the eval sample or which adapter is the best, and must
# match its checkpoint (``TrainOptions.resume_options``): a new option is checked unless it
# is named here.
_MAY_DIFFER_ON_RESUME = frozenset(
    {
        "base",
        "data",
        "eval_split",
        "out",
        "resume",
        "device",
        "threads",
        "progress",
        "save_every",
        "keep_checkpoints",
        "export",
        "overwrite",
        "extra",
    }
)
# option -> the FloraConfig field that holds it
_ADAPTER_FIELDS = {
    "rank": "rank",
    "kernel_rank": "kernel_rank",
    "scale": "scale",
    "targets": "target_modules",
}


def _flag(name: str) -> str:
    """The command-line flag of option ``name`` (``max_length`` -> ``--max-length``)."""
    return "--" + name.replace("_", "-")


@dataclass
class RecipeDefaults:
    """Per-recipe defaults for the options a user leaves unset (``None``)."""

    targets: list[str] | str
    lr: float
    batch_size: int
    epochs: float = 1.0
    scale: float = 1.0
    eval_limit: int = 200
    train_modules: tuple[str, ...] = ()
    """Modules the recipe trains whole (a new head, ``train_modules``): ``--targets`` must
    not select them (a module is adapted or replaced, not both), and ``--export peft``
    cannot carry them (a PEFT LoRA file holds A/B weights only)."""


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
    overwrite: bool = False
    """A run that starts afresh replaces a previous run's outputs in ``out`` (without it,
    such an ``out`` is refused); a run that resumes keeps them."""
    columns: dict[str, str] = field(default_factory=dict)
    """Column mapping for file and ``datasets`` inputs: role (text, label, image, path,
    messages, prompt, completion) -> the column that holds it."""
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.resume is not None and str(self.resume) != "latest":
            self.resume = Path(self.resume)
        self._check()

    def _check(self) -> None:
        """The rule of every option that needs no model, data or device, checked before
        anything is loaded; a broken rule is a TrainError naming its flag. ``None`` passes
        (the recipe's default, or "off"); 0 is never read as "not given"."""
        for name in _AT_LEAST_ONE:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise TrainError(f"{_flag(name)} must be >= 1, got {value}")
        for name in _AT_LEAST_ZERO:
            value = getattr(self, name)
            if value is not None and value < 0:
                raise TrainError(f"{_flag(name)} must be >= 0, got {value}")
        for name in _POSITIVE:
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise TrainError(f"{_flag(name)} must be a finite number > 0, got {value}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise TrainError(
                f"--weight-decay must be a finite number >= 0, got {self.weight_decay}"
            )
        if not 0.0 <= self.warmup < 1.0:
            raise TrainError(f"--warmup must be in [0, 1), got {self.warmup}")
        self._check_adapter_options()
        if self.scale == 0:
            raise TrainError("--scale must not be 0 (the update and its gradients would be 0)")
        parse_eval_split(self.eval_split)
        if self.export not in (None, "peft"):
            raise TrainError(f"--export: unknown format {self.export!r}; use peft")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise TrainError(f"--precision must be fp32, bf16 or fp16, got {self.precision!r}")

    def _check_adapter_options(self) -> None:
        # FloraConfig owns the rules of rank, kernel_rank, scale and target_modules; it is
        # asked one field at a time so that its error names the flag that broke the rule.
        for name, field_name in _ADAPTER_FIELDS.items():
            value = getattr(self, name)
            if value is None:
                continue
            try:
                FloraConfig(**{"target_modules": ["any"], field_name: value})
            except ValueError as exc:
                raise TrainError(f"{_flag(name)}: {exc}") from None

    def resolved(self, defaults: RecipeDefaults) -> TrainOptions:
        """A copy with every ``None`` option replaced by the recipe default, checked
        against what the recipe trains whole (``defaults.train_modules``)."""
        data = asdict(self)
        for key in ("targets", "lr", "batch_size", "scale", "eval_limit"):
            if data[key] is None:
                data[key] = getattr(defaults, key)
        if data["epochs"] is None and data["max_steps"] is None:
            data["epochs"] = defaults.epochs
        resolved = TrainOptions(**data)
        resolved._check_whole_modules(defaults.train_modules)
        return resolved

    def _check_whole_modules(self, whole: tuple[str, ...]) -> None:
        if not whole:
            return
        from flora.config import name_matches

        assert self.targets is not None  # resolved
        picked = [m for m in whole if name_matches(m, self.targets)]
        if picked:
            raise TrainError(
                f"--targets selects {picked[0]!r}, the new head {self.recipe} trains whole: "
                "a module is either adapted or trained whole, not both; leave it out of "
                "--targets"
            )
        if self.export == "peft":
            raise TrainError(
                f"--export peft: {self.recipe} trains its new head {', '.join(whole)} whole, "
                "which a PEFT LoRA file (A/B weights only) cannot carry; PEFT export is for "
                "causal-lm adapters"
            )

    def resume_options(self) -> dict[str, Any]:
        """The options a resumed run must share with its checkpoint (all but
        ``_MAY_DIFFER_ON_RESUME``), JSON-able."""
        return {k: v for k, v in self.to_json().items() if k not in _MAY_DIFFER_ON_RESUME}

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (paths as strings), recorded in metrics.json."""
        data = asdict(self)
        data["out"] = str(self.out)
        data["resume"] = None if self.resume is None else str(self.resume)
        data.pop("progress")
        return data
