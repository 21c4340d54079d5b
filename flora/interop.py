"""Exchange with PEFT LoRA (linear layers) and LyCORIS Tucker-LoCon (conv).

PEFT LoRA adds ``dW = scaling * B @ A`` with ``A`` ``(r, in)``, ``B`` ``(out, r)`` and
``scaling = lora_alpha / r`` (``/ sqrt(r)`` with rslora). That is exactly the 2-mode FLoRA
update ``s * U_out G U_in^T`` with ``U_out = B``, ``U_in = A^T``, ``G = scaling * I_r``,
``s = 1``; so import is lossless. Export folds the core into one factor
(``tucker.fold_linear``): ``A = U_in^T``, ``B = s U_out G``, ``lora_alpha = r``. Modules
of different ranks are zero-padded to the largest rank, which leaves ``B @ A`` unchanged
and keeps the file free of ``rank_pattern`` (which vLLM and LoRAX do not all read).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from flora.adapter import Adapter, AdapterModule, core_key, factor_key
from flora.adapter.container import (
    DEFAULT_MAX_HEADER_BYTES,
    atomic_write,
    decode_tensors,
    encode_tensors,
    strict_json_loads,
)
from flora.adapter.schema import DEFAULT_MAX_RANK
from flora.adapter.validate import check_finite, validate_against
from flora.config import FloraConfig
from flora.errors import (
    AdapterConfigError,
    AdapterError,
    BaseMismatchError,
    NonFiniteError,
    RankLimitError,
    UnknownTensorError,
)
from flora.kinds import ModuleKind, ModuleSpec
from flora.peft_config import PeftLoraConfig
from flora.tucker import fold_linear, reconstruct

__all__ = [
    "PEFT_OPTIONS_WITHOUT_EQUIVALENT",
    "check_peft_exportable",
    "from_peft",
    "refuse_peft_options",
    "to_lycoris",
    "to_peft",
]

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LYCORIS_PREFIX = "lycoris_"
_LORA_KEY = re.compile(
    r"(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.weight)?"
)
# PEFT LoraConfig options that, when set, make the network differ from ``W + scaling * B @ A``
# on every token: the LoRA variants (PEFT marks them ``is_lora_variant``: DoRA, aLoRA, which
# applies only from its invocation tokens on, VeLoRA, MonteCLoRA, BD-LoRA, Arrow routing,
# KaSA), QALoRA's pooled inputs, and options that add weights or layers. An import that
# dropped one would serve other maths, so each is refused; the server's PEFT upload refuses
# through this same list (`refuse_peft_options`).
PEFT_OPTIONS_WITHOUT_EQUIVALENT = (
    "alora_invocation_tokens",
    "arrow_config",
    "kasa_config",
    "layer_replication",
    "lora_bias",
    "monteclora_config",
    "target_parameters",
    "use_bdlora",
    "use_dora",
    "use_qalora",
    "velora_config",
)
_SHOWN_VALUE_CHARS = 60


def refuse_peft_options(cfg: dict[str, Any]) -> None:
    """Raise ``AdapterConfigError`` naming the first option of
    :data:`PEFT_OPTIONS_WITHOUT_EQUIVALENT` that a PEFT config sets (a true, non-empty
    value: PEFT writes ``false`` / ``null`` / ``[]`` for the ones not used)."""
    for option in PEFT_OPTIONS_WITHOUT_EQUIVALENT:
        value = cfg.get(option)
        if value:
            shown = repr(value)
            if len(shown) > _SHOWN_VALUE_CHARS:
                shown = shown[: _SHOWN_VALUE_CHARS - 3] + "..."
            raise AdapterConfigError(f"PEFT option {option}={shown} has no exact FLoRA equivalent")


def from_peft(
    peft_dir: str | os.PathLike[str],
    *,
    base: torch.nn.Module | None = None,
    max_rank: int = DEFAULT_MAX_RANK,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> Adapter:
    """Import a PEFT LoRA adapter directory as an exact FLoRA adapter.

    Each module with ``lora_A`` ``(r, in)`` and ``lora_B`` ``(out, r)`` becomes a 2-mode
    FLoRA module with ``G = scaling * I_r`` (``scaling = alpha / r`` or ``alpha / sqrt(r)``
    for rslora, ``alpha`` from ``alpha_pattern`` where it matches); ``r`` must be the rank
    the config gives the module (``rank_pattern`` where it matches, else ``r``), as PEFT
    builds its layers at that rank. The config's fields are checked by
    ``flora.peft_config.PeftLoraConfig`` (pattern keys matched without backtracking, see
    there). Linear layers map to
    modes ``(out, in)``; with ``fan_in_fan_out`` (transformers ``Conv1D``) to ``(in, out)``;
    embeddings (``lora_embedding_A`` ``(r, num)``, ``lora_embedding_B`` ``(dim, r)``) to
    ``(num, dim)``. The weights go through the same safetensors checks as FLoRA files.
    With ``base``, module kinds come from the base, the base fingerprint is recorded and
    the result is checked with ``validate_against``; without it the fingerprint is None.

    Raises:
        AdapterError: not a LoRA adapter, a LoRA variant or option with other maths
        (``PEFT_OPTIONS_WITHOUT_EQUIVALENT``: DoRA, aLoRA, ...), conv LoRA, bias
        training, a config field of
        the wrong type or value (``AdapterConfigError`` naming it), or a subclass for the
        file problems ``load_adapter`` also catches.
    """
    root = Path(peft_dir)
    cfg = strict_json_loads(_read(root / PEFT_CONFIG, max_header_bytes), PEFT_CONFIG)
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise AdapterConfigError("PEFT adapter_config.json: only peft_type LORA can be imported")
    refuse_peft_options(cfg)
    if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
        raise AdapterConfigError("PEFT bias training / modules_to_save are not imported")
    peft = PeftLoraConfig.from_json(cfg)
    _, tensors = decode_tensors(
        _read(root / PEFT_WEIGHTS, None), max_header_bytes=max_header_bytes, what=PEFT_WEIGHTS
    )
    check_finite(tensors)
    _drop_saved_base_weights(tensors, base)
    pairs = _lora_pairs(tensors)
    base_specs = None
    if base is not None:
        from flora.fingerprint import describe_base

        base_specs = describe_base(base)
    out_tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, AdapterModule] = {}
    kind: ModuleKind
    for name, (a, b, embedding) in sorted(pairs.items()):
        r = a.shape[0]
        if b.shape[1] != r:
            raise AdapterError(f"PEFT module {name!r}: lora_A has rank {r}, lora_B {b.shape[1]}")
        want, field = peft.rank_for(name)
        if r != want:  # PEFT itself could not load it (its layers are built at `want`)
            raise AdapterConfigError(
                f"PEFT module {name!r}: lora_A has rank {r}, the config's {field} says {want}"
            )
        scaling = peft.scaling(name, r)
        if embedding:
            kind, shape, factors = "embedding", (a.shape[1], b.shape[0]), [a.T, b]
        elif peft.fan_in_fan_out:
            kind, shape, factors = "hf_conv1d", (a.shape[1], b.shape[0]), [a.T, b]
        else:
            kind, shape, factors = "linear", (b.shape[0], a.shape[1]), [b, a.T]
        spec = ModuleSpec(kind, shape)  # validate_against compares it with the base's
        if r > max_rank or r > min(shape):
            raise RankLimitError(
                f"PEFT module {name!r}: rank {r} exceeds min({max_rank}, {min(shape)})"
            )
        core = (torch.eye(r, dtype=torch.float32) * scaling).to(a.dtype)
        if not bool(torch.isfinite(core).all()):
            raise NonFiniteError(
                f"PEFT module {name!r}: scaling {scaling:g} (lora_alpha / alpha_pattern over "
                f"r) is not finite in {a.dtype}"
            )
        out_tensors[core_key(name)] = core
        for m, u in enumerate(factors):
            out_tensors[factor_key(name, m)] = u.contiguous().clone()
        modules[name] = AdapterModule(spec=spec, ranks=(r, r))
    config = FloraConfig(
        target_modules=sorted(modules),
        rank=max(m.ranks[0] for m in modules.values()),
        scale=1.0,
        rank_pattern={n: list(m.ranks) for n, m in modules.items()},
    )
    fingerprint = None
    if base is not None:
        from flora.fingerprint import base_fingerprint

        fingerprint = base_fingerprint(base)
    adapter = Adapter(
        config=config,
        tensors=out_tensors,
        modules=modules,
        base_model_id=peft.base_model_name_or_path,
        fingerprint=fingerprint,
        task=peft.task_type,
        metadata={"imported_from": "peft"},
    )
    if base_specs is not None:
        validate_against(adapter, base_specs, fingerprint)
    return adapter


def _drop_saved_base_weights(
    tensors: dict[str, torch.Tensor], base: torch.nn.Module | None
) -> None:
    """Drop ``<module>.base_layer.weight`` copies that PEFT saves for targeted embeddings.

    LoRA keeps them frozen, so they must equal the base's; with ``base`` that is checked
    (a resized or retrained embedding cannot be imported), without it they are ignored.
    """
    base_state = base.state_dict() if base is not None else None
    for key in [k for k in tensors if k.endswith(".base_layer.weight")]:
        value = tensors.pop(key)
        if base_state is None:
            continue
        name = key[len(PEFT_PREFIX) :].replace(".base_layer.weight", ".weight")
        own = base_state.get(name)
        if own is None or own.shape != value.shape or not torch.equal(own, value.to(own.dtype)):
            raise BaseMismatchError(
                f"PEFT tensor {key!r} differs from the base's {name!r} (resized or retrained "
                "embedding); only LoRA A/B weights can be imported"
            )


def _lora_pairs(
    tensors: dict[str, torch.Tensor],
) -> dict[str, tuple[torch.Tensor, torch.Tensor, bool]]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _LORA_KEY.fullmatch(key)
        if match is None or not key.startswith(PEFT_PREFIX):
            raise UnknownTensorError(f"PEFT tensor {key!r} is not a LoRA A/B weight")
        name = match["module"][len(PEFT_PREFIX) :]
        parts.setdefault(name, {})[match["part"]] = value
    out = {}
    for name, p in parts.items():
        embedding = "lora_embedding_A" in p
        a = p.get("lora_embedding_A" if embedding else "lora_A")
        b = p.get("lora_embedding_B" if embedding else "lora_B")
        if a is None or b is None or len(p) != 2:
            raise AdapterError(f"PEFT module {name!r} needs exactly one A and one B weight")
        if a.dim() != 2 or b.dim() != 2:
            raise AdapterError(
                f"PEFT module {name!r}: conv LoRA (A of shape {list(a.shape)}) is not imported"
            )
        out[name] = (a, b, embedding)
    if not out:
        raise AdapterError("PEFT adapter holds no LoRA weights")
    return out


def to_peft(
    adapter: Adapter,
    out_dir: str | os.PathLike[str],
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Export a FLoRA adapter on Linear / transformers Conv1D layers as PEFT LoRA.

    Every module is folded at rank ``min(r_out, r_in)`` (``tucker.fold_linear`` or its
    mirror; exact: ``B @ A == dW``) and zero-padded to the largest such rank ``r``;
    ``lora_alpha = r`` so PEFT's scaling is 1.
    Writes ``adapter_config.json`` and ``adapter_model.safetensors`` (keys
    ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``). Returns ``out_dir``.

    Raises:
        AdapterError: a conv or embedding module (use ``to_lycoris`` for conv), trained
        full modules, or Linear and Conv1D modules mixed (PEFT has one fan_in_fan_out).
    """
    kinds = {n: m.spec.kind for n, m in adapter.modules.items()}
    check_peft_exportable(kinds, adapter.full_modules())
    fan_in_fan_out = set(kinds.values()) == {"hf_conv1d"}
    folded = {}
    for name in adapter.layer_names():
        core = adapter.core(name).float()
        u0, u1 = (u.float() for u in adapter.factors(name))
        if fan_in_fan_out:  # stored (in, out): B @ A must be dW^T = s U_1 G^T U_0^T
            core, u0, u1 = core.T, u1, u0
        folded[name] = _fold_min_rank(core, u0, u1, adapter.config.scale)
    r = max(a.shape[0] for a, _ in folded.values())
    dtype = next(iter(adapter.tensors.values())).dtype
    tensors = {}
    for name, (a, b) in folded.items():
        pad = r - a.shape[0]
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])]) if pad else a
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1) if pad else b
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.to(dtype).contiguous()
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if adapter.task == "causal-lm" else None,
        "base_model_name_or_path": base_model_name_or_path or adapter.base_model_id,
        "r": r,
        "lora_alpha": r,
        "lora_dropout": 0.0,
        "target_modules": sorted(adapter.modules),
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / PEFT_WEIGHTS, encode_tensors(tensors, {"format": "pt"}))
    atomic_write(out / PEFT_CONFIG, json.dumps(config, indent=2).encode())
    return out


def check_peft_exportable(kinds: Mapping[str, str], full_modules: Sequence[str]) -> None:
    """Raise ``AdapterError`` unless :func:`to_peft` can export an adapter whose modules
    have these ``kinds`` (name -> ``ModuleSpec.kind``) and that saves ``full_modules``
    whole: Linear or Conv1D modules, not both, and no module saved whole. (``flora-train
    --export peft`` asks before it trains.)"""
    bad = sorted(n for n, kind in kinds.items() if kind not in ("linear", "hf_conv1d"))
    if bad:
        raise AdapterError(
            f"module {bad[0]!r} is {kinds[bad[0]]}; PEFT LoRA export covers "
            "Linear and transformers Conv1D only (conv: use to_lycoris)"
        )
    if len(set(kinds.values())) > 1:
        raise AdapterError("PEFT cannot mix Linear and Conv1D modules (one fan_in_fan_out flag)")
    if full_modules:
        raise AdapterError(
            f"trained module {full_modules[0]!r} is not exported; PEFT LoRA servers "
            "serve A/B weights only"
        )


def _fold_min_rank(
    core: torch.Tensor, u0: torch.Tensor, u1: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``B @ A = s U_0 G U_1^T`` at rank ``min(r_0, r_1)``.

    ``fold_linear`` puts the core into B (rank r_1); when the output side is smaller,
    put it into A instead: ``A = G U_1^T`` ``(r_0, d_1)``, ``B = s U_0`` ``(d_0, r_0)``.
    """
    if core.shape[0] < core.shape[1]:
        return core @ u1.T, u0 * scale
    return fold_linear(core, [u0, u1], scale)


def to_lycoris(adapter: Adapter, path: str | os.PathLike[str]) -> Path:
    """Export as LyCORIS LoCon (Tucker form for conv) in one safetensors file.

    Conv module with modes ``(out, in, k_1..k_m)``: ``lora_up`` ``(out, r, 1..)`` = U_out,
    ``lora_down`` ``(r, in, 1..)`` = U_in^T, ``lora_mid`` ``(r, r, k_1..k_m)`` =
    ``s * G x_k1 U_k1 ... x_km U_km`` (kernel factors folded into the mid kernel, which is
    exact at any kernel rank), ``alpha = r`` (LyCORIS scale ``alpha / r = 1``); the two
    channel ranks are zero-padded to ``r = max(r_out, r_in)``. Linear modules:
    ``lora_up`` ``(out, r)``, ``lora_down`` ``(r, in)`` from ``fold_linear``. Keys are
    ``lycoris_<module with dots as underscores>.<part>``.

    Raises:
        AdapterError: grouped convs (LoCon's 1x1 down-projection sees all input channels,
        so a grouped update has no LoCon equivalent), embeddings, transformers Conv1D,
        or trained full modules.
    """
    if adapter.full_modules():
        raise AdapterError("trained full modules have no LyCORIS LoCon equivalent")
    s = adapter.config.scale
    tensors: dict[str, torch.Tensor] = {}
    for name in adapter.layer_names():
        spec = adapter.modules[name].spec
        core = adapter.core(name).float()
        factors = [u.float() for u in adapter.factors(name)]
        prefix = LYCORIS_PREFIX + name.replace(".", "_")
        if spec.kind == "linear":
            down, up = _fold_min_rank(core, factors[0], factors[1], s)
            r = down.shape[0]
            parts = {"lora_down": down, "lora_up": up}
        elif spec.kind in ("conv1d", "conv2d", "conv3d"):
            if spec.groups != 1:
                raise AdapterError(
                    f"module {name!r} is a grouped conv (groups={spec.groups}); LyCORIS LoCon "
                    "has no grouped form, so the export would not be exact"
                )
            # mid = s * G x_k U_k over the kernel modes only; channel modes stay (r_out, r_in).
            eye = [torch.eye(core.shape[0]), torch.eye(core.shape[1])]
            mid = reconstruct(core, eye + factors[2:], s)
            r = max(core.shape[0], core.shape[1])
            mid = torch.nn.functional.pad(
                mid, [0, 0] * (mid.dim() - 2) + [0, r - mid.shape[1], 0, r - mid.shape[0]]
            )
            ones = (1,) * (mid.dim() - 2)
            up = _pad_cols(factors[0], r).reshape(spec.weight_shape[0], r, *ones)
            down = _pad_cols(factors[1], r).T.reshape(r, spec.weight_shape[1], *ones)
            parts = {"lora_down": down, "lora_mid": mid, "lora_up": up}
        else:
            raise AdapterError(f"module {name!r} is {spec.kind}; LyCORIS export covers Linear/Conv")
        for part, value in parts.items():
            tensors[f"{prefix}.{part}.weight"] = value.contiguous()
        tensors[f"{prefix}.alpha"] = torch.tensor(float(r))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, encode_tensors(tensors, {"format": "pt"}))
    return out


def _pad_cols(u: torch.Tensor, r: int) -> torch.Tensor:
    return torch.cat([u, u.new_zeros(u.shape[0], r - u.shape[1])], dim=1) if u.shape[1] < r else u


def _read(path: Path, cap: int | None) -> bytes:
    try:
        with path.open("rb") as fh:
            data = fh.read() if cap is None else fh.read(cap + 1)
    except OSError as exc:
        raise AdapterError(f"cannot read {path.name}: {exc.strerror}") from exc
    if cap is not None and len(data) > cap:
        raise AdapterConfigError(f"{path.name} is larger than {cap} bytes")
    return data
