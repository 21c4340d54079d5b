"""Checkpoints: the adapter (format v1) plus the trainer state, all safetensors + JSON.

``<dir>/adapter_config.json`` + ``adapter.safetensors`` are a normal adapter (loadable with
``flora.load_adapter``); ``trainer_state.safetensors`` holds the AdamW moments (keyed by
parameter name) and the torch RNG state; ``trainer_state.json`` the step and loss history,
what the run was (``run``: the options that change the result, the data's identity and the
labels, which a resumed run must match), and in fp16 runs the gradient scaler's state (its
scale and growth counter: a few numbers). No pickle anywhere.

A checkpoint is written into a hidden temporary directory beside it and renamed into place
once every file is complete, so a ``step-N`` directory is always whole; a damaged one (a
truncated or corrupt file, a missing entry) is one :class:`TrainError`, not a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

import flora
from flora.adapter.adapter import FULL_PREFIX
from flora.adapter.container import atomic_write, fsync_dir
from flora.train.errors import TrainError
from flora.train.options import TrainOptions

try:  # POSIX; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
RUN_KEY = "run"
_RNG_KEY = "rng.torch"
SCALER_KEY = "grad_scaler"
LOCK_NAME = ".flora-train.lock"
# GradScaler.state_dict() of an enabled scaler: which entries are counters, which factors.
_SCALER_INTS = ("growth_interval", "_growth_tracker")
_SCALER_FLOATS = ("scale", "growth_factor", "backoff_factor")
_HASH_CHUNK = 1 << 20


# -- what a run is ------------------------------------------------------------------------


def data_identity(spec: str | None) -> dict[str, Any] | None:
    """What identifies the data behind ``spec`` (``--data``, or an ``--eval-split`` file):
    a builtin's name; a file's size and sha256; a directory's file count, total size and
    the sha256 of its listing (relative path and size of every file: a file added,
    removed, renamed or resized changes it, an edit that keeps every size does not, so
    that a folder of large images is not read through). None: no such path (the loader
    reports it)."""
    if spec is None:
        return None
    if spec.startswith("builtin:"):
        return {"builtin": spec}
    path = Path(spec)
    if path.is_file():
        st = path.stat()
        sha = _file_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)
        return {"bytes": st.st_size, "sha256": sha}
    if path.is_dir():
        listing = hashlib.sha256()
        count = total = 0
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            size = file.stat().st_size
            listing.update(f"{file.relative_to(path).as_posix()}\0{size}\n".encode())
            count, total = count + 1, total + size
        return {"files": count, "bytes": total, "listing_sha256": listing.hexdigest()}
    return None


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """A file's sha256, read once per (path, size, mtime): a resume checks its data before
    the base loads and again under the run lock, and a large file is not read twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def run_identity(options: TrainOptions) -> dict[str, Any]:
    """``trainer_state.json``'s ``run`` before the labels are known: the options a resumed
    run must share (``TrainOptions.resume_options``) and the identity of its data."""
    from flora.train.data import parse_eval_split

    eval_split = parse_eval_split(options.eval_split)
    return {
        "options": options.resume_options(),
        "data": {"spec": options.data, "identity": data_identity(options.data)},
        "eval_split": {
            "spec": options.eval_split,
            "identity": data_identity(eval_split)
            if isinstance(eval_split, str)
            else {"fraction": eval_split},
        },
    }


def check_run(state: dict[str, Any], current: dict[str, Any], where: Path) -> bool:
    """TrainError unless the checkpoint's ``run`` (``state``) matches ``current``
    (:func:`run_identity`): data whose identity differs is named by ``--data`` /
    ``--eval-split`` (data that is not there is left to the loader), then the first
    option that differs by its flag. False when the checkpoint records no run (an older
    version's)."""
    saved = state.get(RUN_KEY)
    if saved is None:
        return False
    if not isinstance(saved, dict) or not isinstance(saved.get("options"), dict):
        raise TrainError(f"--resume {where}: {RUN_KEY} in {STATE_JSON} is malformed")
    for key, flag in (("data", "--data"), ("eval_split", "--eval-split")):
        old, new = saved.get(key), current[key]
        if new["identity"] is None:  # not there: the loader says so
            continue
        if not isinstance(old, dict) or old.get("identity") != new["identity"]:
            old = old if isinstance(old, dict) else {}
            raise TrainError(
                f"--resume {where}: {flag} {new['spec']} is not what the checkpoint was "
                f"trained on ({old.get('spec')}: {_describe(old.get('identity'))}; now "
                f"{_describe(new['identity'])})"
            )
    want, have = saved["options"], current["options"]
    for name in [*want, *(n for n in have if n not in want)]:
        if want.get(name) != have.get(name):
            flag = "--" + name.replace("_", "-")
            raise TrainError(
                f"--resume {where}: the checkpoint was trained with {flag} "
                f"{_shown(want.get(name))}, this run has {_shown(have.get(name))}; resume "
                "with the checkpoint's options, or start afresh (--overwrite, no --resume)"
            )
    return True


def check_labels(saved: list[str] | None, labels: list[str] | None, where: Path) -> None:
    """TrainError unless a resumed run has the checkpoint's labels, in its order (the
    head's row ``i`` is class ``labels[i]``)."""
    if saved != labels:
        raise TrainError(
            f"--resume {where}: the checkpoint's labels {_shown(saved)} differ from this "
            f"run's {_shown(labels)}: its head would answer with the wrong classes"
        )


def _shown(value: Any, limit: int = 120) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(identity: Any) -> str:
    if not isinstance(identity, dict):
        return "not there"
    return ", ".join(f"{k} {v}" for k, v in identity.items())


# -- writing ----------------------------------------------------------------------------


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    adapter_kwargs: dict[str, Any],
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Write adapter + optimizer moments + RNG + ``state`` (step, losses, run, ...), plus
    the state of ``scaler`` when it is enabled (fp16; other runs' checkpoints have none).

    Everything goes to a hidden directory beside ``directory`` first (each file fsynced),
    which is then renamed to ``directory``: a crash leaves the previous contents or the
    complete new checkpoint, never a partial ``step-N``."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors: dict[str, torch.Tensor] = {_RNG_KEY: torch.get_rng_state()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                tensors[f"opt.{names[id(p)]}.{key}"] = value.detach().cpu().reshape(value.shape)
    if scaler is not None and scaler.is_enabled():
        state = {**state, SCALER_KEY: scaler.state_dict()}
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        flora.save_adapter(model, tmp, **adapter_kwargs)
        atomic_write(tmp / STATE_TENSORS, st_save({k: v.contiguous() for k, v in tensors.items()}))
        atomic_write(tmp / STATE_JSON, json.dumps(state, indent=1).encode())
        _rename_into_place(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _rename_into_place(tmp: Path, directory: Path) -> None:
    """``tmp`` becomes ``directory``; an existing ``directory`` (a step written again, as
    on a resume) is moved aside first and deleted after."""
    old = None
    if directory.exists():
        old = directory.parent / f".{directory.name}.old-{secrets.token_hex(4)}"
        os.replace(directory, old)
    os.replace(tmp, directory)
    fsync_dir(directory.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_partial_checkpoints(root: Path) -> list[Path]:
    """Delete what an interrupted :func:`save_checkpoint` left under ``root`` (its hidden
    ``.step-N.tmp-*`` / ``.step-N.old-*`` directories); returns them. Only call it while
    holding the run lock (:func:`run_lock`)."""
    if not root.is_dir():
        return []
    left = [
        d
        for d in root.iterdir()
        if d.is_dir()
        and d.name.startswith("." + STEP_PREFIX)
        and (".tmp-" in d.name or ".old-" in d.name)
    ]
    for d in left:
        shutil.rmtree(d, ignore_errors=True)
    return left


# -- reading ----------------------------------------------------------------------------


def check_checkpoint_dir(directory: Path) -> None:
    """TrainError unless ``directory`` holds a checkpoint's files (the cheap check, done
    before anything is loaded; :func:`read_state` and :func:`load_checkpoint` check the
    rest)."""
    if not (directory / STATE_JSON).is_file() or not (directory / STATE_TENSORS).is_file():
        raise TrainError(f"--resume {directory}: not a checkpoint (no {STATE_JSON})")


def read_state(directory: Path) -> dict[str, Any]:
    """The checked contents of ``directory/trainer_state.json``. TrainError, naming the
    file, when it is not a checkpoint's: not JSON (e.g. truncated), or a field of the
    wrong type (``step`` a count, ``losses`` one finite number per step, ...)."""
    check_checkpoint_dir(directory)
    where = f"--resume {directory}: {STATE_JSON}"
    try:
        state = json.loads((directory / STATE_JSON).read_bytes())
    except OSError as exc:
        raise TrainError(f"{where} cannot be read ({exc.strerror or exc})") from None
    except (ValueError, RecursionError) as exc:  # JSON and UTF-8 errors are ValueErrors
        raise TrainError(f"{where} is not valid JSON ({exc}): the checkpoint is damaged") from None
    if not isinstance(state, dict):
        raise TrainError(f"{where} is not a JSON object: the checkpoint is damaged")
    step, losses = state.get("step"), state.get("losses")
    if type(step) is not int or step < 0:
        raise TrainError(f"{where}: step must be a count, got {_shown(step)}")
    if not isinstance(losses, list) or len(losses) != step or not all(_finite(x) for x in losses):
        raise TrainError(f"{where}: losses must hold one finite number per step ({step})")
    seconds = state.get("train_seconds", 0.0)
    if not _finite(seconds) or seconds < 0:
        raise TrainError(f"{where}: train_seconds must be a number >= 0, got {_shown(seconds)}")
    metrics = state.get("base_metrics", {})
    if not isinstance(metrics, dict) or not all(_finite(v) for v in metrics.values()):
        raise TrainError(f"{where}: base_metrics must map names to numbers")
    best = state.get("best")
    if best is not None and (
        not isinstance(best, dict)
        or not (best.get("value") is None or _finite(best["value"]))
        or not (best.get("step") is None or type(best["step"]) is int)
    ):
        raise TrainError(f"{where}: best is malformed: {_shown(best)}")
    return state


def _finite(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def load_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    labels: list[str] | None,
) -> dict[str, Any]:
    """Load a checkpoint into an injected ``model`` and its ``optimizer``; returns the
    saved state (:func:`read_state`). TrainError if the directory is not a whole
    checkpoint of this run: a damaged file, an adapter of another base, shape or
    ``labels`` (this run's class names, in order), optimizer state that does not fit, no
    RNG state. Nothing is changed before everything is checked."""
    state = read_state(directory)
    try:
        adapter = flora.load_adapter(directory)
    except flora.AdapterError as exc:
        raise TrainError(f"--resume {directory}: {exc}") from None
    check_labels(adapter.labels, labels, directory)
    _check_base(model, adapter, directory)
    saved = _read_state_tensors(directory)
    rng = saved.get(_RNG_KEY)
    if rng is None or rng.dtype != torch.uint8 or rng.dim() != 1:
        raise TrainError(
            f"--resume {directory}: {STATE_TENSORS} holds no {_RNG_KEY} (the RNG state) "
            "or a malformed one: the checkpoint is damaged"
        )
    moments = _optimizer_state(directory, model, optimizer, saved)
    _copy_adapter(model, adapter)
    for p, entry in moments.items():
        optimizer.state[p] = entry
    try:
        torch.set_rng_state(rng)
    except (RuntimeError, ValueError) as exc:
        raise TrainError(f"--resume {directory}: {_RNG_KEY} cannot be restored ({exc})") from None
    return state


def _read_state_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / STATE_TENSORS
    try:
        return st_load(path.read_bytes())
    except OSError as exc:
        raise TrainError(f"--resume {directory}: {STATE_TENSORS} cannot be read ({exc})") from None
    except Exception as exc:  # safetensors' own parser: a truncated or corrupt file
        raise TrainError(
            f"--resume {directory}: {STATE_TENSORS} is not a safetensors file ({exc}): the "
            "checkpoint is damaged"
        ) from None


def _optimizer_state(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    saved: dict[str, torch.Tensor],
) -> dict[torch.nn.Parameter, dict[str, torch.Tensor]]:
    """The AdamW state per trained parameter, checked to fit it: moments shaped like the
    parameter, a one-element step count, nothing for parameters this run does not train."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[torch.nn.Parameter, dict[str, torch.Tensor]] = {}
    claimed = {_RNG_KEY}
    for group in optimizer.param_groups:
        for p in group["params"]:
            prefix = f"opt.{names[id(p)]}."
            entry = {k[len(prefix) :]: v for k, v in saved.items() if k.startswith(prefix)}
            for key, value in entry.items():
                fits = value.numel() == 1 if key == "step" else tuple(value.shape) == tuple(p.shape)
                if not fits or not value.is_floating_point():
                    raise TrainError(
                        f"--resume {directory}: optimizer state {prefix}{key} has shape "
                        f"{list(value.shape)}, the parameter {list(p.shape)}"
                    )
                claimed.add(prefix + key)
            if entry:
                # AdamW keeps its step count on the CPU and its moments beside the parameter.
                out[p] = {k: v if k == "step" else v.to(p.device) for k, v in entry.items()}
    other = sorted(set(saved) - claimed)
    if other:
        raise TrainError(
            f"--resume {directory}: {STATE_TENSORS} holds {other[0]!r}, which this run "
            "does not train"
        )
    return out


def _check_base(model: nn.Module, adapter: flora.Adapter, directory: Path) -> None:
    """The checkpoint's adapter was trained on this base (its fingerprint, less the
    modules it retrains whole)."""
    from flora.adapter.io import fingerprint_without_trained

    if adapter.fingerprint is None:
        return
    if fingerprint_without_trained(model, adapter.config.train_modules) != adapter.fingerprint:
        raise TrainError(
            f"--resume {directory}: the checkpoint was trained on another base "
            f"({adapter.base_model_id}, fingerprint {adapter.fingerprint})"
        )


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
    for name, layer in layers.items():
        if tuple(layer.core.shape) != tuple(adapter.core(name).shape):
            raise TrainError(f"--resume: ranks of {name!r} differ from this run's")
    for key, value in adapter.tensors.items():
        if key.startswith(FULL_PREFIX):
            target = params.get(key[len(FULL_PREFIX) :])
            if target is None or target.shape != value.shape:
                raise TrainError(f"--resume: {key} does not fit this run's model")
    with torch.no_grad():
        for name, layer in layers.items():
            layer.core.copy_(adapter.core(name))
            for u, value in zip(layer.factors, adapter.factors(name), strict=True):
                u.copy_(value)
        for key, value in adapter.tensors.items():
            if key.startswith(FULL_PREFIX):
                params[key[len(FULL_PREFIX) :]].copy_(value)


# -- the checkpoints of a run --------------------------------------------------------------

STEP_PREFIX = "step-"


def step_dir(root: Path, step: int) -> Path:
    """``root/step-NNNNNN``: the checkpoint of ``step`` (zero-padded, so names sort)."""
    return root / f"{STEP_PREFIX}{step:06d}"


def step_checkpoints(root: Path) -> list[Path]:
    """Complete step checkpoints under ``root``, oldest first (only renamed-into-place
    ``step-N`` directories count; a save cut off mid-way left a hidden one)."""
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
    old = step_checkpoints(root)[:-keep] if keep > 0 else []
    for d in old:
        shutil.rmtree(d, ignore_errors=True)
    return old


# -- one run per --out ------------------------------------------------------------------


def _lock_error(out: Path) -> TrainError:
    return TrainError(
        f"--out {out}: another flora-train run is writing to it (it holds {out / LOCK_NAME})"
    )


def check_unlocked(out: Path) -> None:
    """TrainError when another process holds ``out``'s run lock; takes nothing and
    creates nothing (the check before anything is loaded; :func:`run_lock` decides)."""
    path = out / LOCK_NAME
    if fcntl is None or not path.is_file():
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _lock_error(out) from None
    finally:
        os.close(fd)  # also releases the probe's lock


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``out/.flora-train.lock`` for the block: a
    second run into the same ``--out`` is a TrainError instead of two runs writing the
    same files. The lock goes with the process (a killed run leaves no stale lock); the
    file stays."""
    if fcntl is None:
        yield
        return
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _lock_error(out) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)
