"""Loaders for Hugging Face-format directories (converted embedded models and user dirs).

Each loader takes a :class:`LoadRequest` and returns a :class:`LoadedModel` in eval mode on
the requested device and dtype. transformers is imported inside the functions so that
``python -m flora.models list`` and ``import flora.models`` stay fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from flora.models.errors import UnsupportedModelError
from flora.models.registry import LoadRequest
from flora.models.storage import read_json
from flora.models.types import LoadedModel, ModelKind, Pooling, PoolingMode

# Tokenizers report this sentinel (int(1e30)) when the limit is unknown.
_HUGE = 10**9


def weights_file(directory: Path) -> Path:
    """The safetensors weights of a directory (single file or the sharded index)."""
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (directory / name).is_file():
            return directory / name
    raise UnsupportedModelError(
        f"{directory} has no model.safetensors; only safetensors weights are loaded "
        "(pickled .bin checkpoints are refused)"
    )


def context_length(directory: Path, config: Any, tokenizer: Any) -> int | None:
    """Longest input the model accepts.

    sentence-transformers' ``max_seq_length`` wins (all-MiniLM-L6-v2 was trained at 256),
    then the smaller of the tokenizer's ``model_max_length`` and the position table size.
    """
    st = directory / "sentence_bert_config.json"
    if st.is_file():
        value = read_json(st).get("max_seq_length")
        if isinstance(value, int) and value > 0:
            return value
    candidates = [
        v
        for v in (
            getattr(tokenizer, "model_max_length", None),
            getattr(config, "max_position_embeddings", None),
        )
        if isinstance(v, int) and 0 < v < _HUGE
    ]
    return min(candidates) if candidates else None


def read_pooling(directory: Path) -> Pooling:
    """Pooling of a sentence-transformers directory (modules.json), else mean + L2 norm.

    Only mean and CLS pooling are supported; a directory asking for max pooling (or a
    module we do not implement) is refused rather than silently pooled differently.
    """
    modules_path = directory / "modules.json"
    if not modules_path.is_file():
        return Pooling(mode="mean", normalize=True)
    modules = read_json(modules_path)
    normalize = any(str(m.get("type", "")).endswith(".Normalize") for m in modules)
    pooling_mods = [m for m in modules if str(m.get("type", "")).endswith(".Pooling")]
    if len(pooling_mods) != 1:
        raise UnsupportedModelError(f"{modules_path}: expected exactly one Pooling module")
    cfg = read_json(directory / pooling_mods[0].get("path", "") / "config.json")
    # Older configs set one boolean flag per mode; newer ones name the mode in a string.
    flags = {k for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True}
    named = cfg.get("pooling_mode")
    if isinstance(named, str) and not flags:
        flags = {f"pooling_mode_{named}"}
    mode: PoolingMode
    if flags in ({"pooling_mode_mean_tokens"}, {"pooling_mode_mean"}):
        mode = "mean"
    elif flags in ({"pooling_mode_cls_token"}, {"pooling_mode_cls"}):
        mode = "cls"
    else:
        raise UnsupportedModelError(f"unsupported sentence-transformers pooling {cfg}")
    known = (".Transformer", ".Pooling", ".Normalize")
    unknown = [m["type"] for m in modules if not str(m.get("type", "")).endswith(known)]
    if unknown:
        raise UnsupportedModelError(f"unsupported sentence-transformers modules {unknown}")
    return Pooling(mode=mode, normalize=normalize)


def _place(model: nn.Module, req: LoadRequest) -> nn.Module:
    model.to(device=req.device, dtype=req.dtype)
    model.eval()
    return model


def _load_auto(req: LoadRequest, auto_name: str, kind: ModelKind, **extra: Any) -> LoadedModel:
    import transformers

    auto = getattr(transformers, auto_name)
    source = weights_file(req.directory)
    # Weights are loaded straight in the runtime dtype; the fingerprint was taken from the
    # fp32 files beforehand, so it does not depend on this choice.
    model, info = auto.from_pretrained(
        str(req.directory), dtype=req.dtype, output_loading_info=True
    )
    _refuse_random_weights(model, set(info.get("missing_keys") or ()), kind, req.directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(req.directory))
    labels = None
    if kind == "text-classifier":
        id2label = getattr(model.config, "id2label", None) or {}
        labels = [str(id2label[i]) for i in sorted(id2label)] or None
    return LoadedModel(
        name=req.name,
        kind=kind,
        model=_place(model, req),
        preprocessor=tokenizer,
        fingerprint=req.fingerprint,
        labels=labels,
        context_length=context_length(req.directory, model.config, tokenizer),
        source_path=source,
        config={"hidden_size": getattr(model.config, "hidden_size", None)},
        **extra,
    )


def _refuse_random_weights(model: nn.Module, missing: set[str], kind: str, where: Path) -> None:
    """A parameter absent from the checkpoint is randomly initialised by transformers: the
    base would differ on every load (and so would its fingerprint). An encoder loaded from a
    masked-LM checkpoint lacks only the pooler, which embeddings never use: drop it.
    Anything else missing is refused."""
    only_pooler = bool(missing) and all(k.startswith("pooler.") for k in missing)
    if kind == "text-encoder" and only_pooler and getattr(model, "pooler", None) is not None:
        model.register_module("pooler", None)  # as `model.pooler = None` does
        return
    if missing:
        shown = ", ".join(sorted(missing)[:5])
        raise UnsupportedModelError(
            f"{where}: checkpoint lacks {len(missing)} weight(s) the {kind} needs ({shown}); "
            "they would be randomly initialised"
        )


def load_causal_lm(req: LoadRequest) -> LoadedModel:
    """AutoModelForCausalLM + its tokenizer (chat template included when the dir has one)."""
    return _load_auto(req, "AutoModelForCausalLM", "causal-lm")


def load_text_classifier(req: LoadRequest) -> LoadedModel:
    """AutoModelForSequenceClassification; ``labels`` from ``config.id2label``."""
    return _load_auto(req, "AutoModelForSequenceClassification", "text-classifier")


def load_text_encoder(req: LoadRequest) -> LoadedModel:
    """AutoModel (the bare encoder) + pooling; embed with :func:`flora.models.encode`."""
    return _load_auto(req, "AutoModel", "text-encoder", pooling=read_pooling(req.directory))
