"""The engine for the loaded base's kind: load the base (blocking), build the engine that
serves it and the validator that checks uploads against it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flora_server.adapters.registry import AdapterRegistry, AdapterValidator
from flora_server.adapters.validator import BaseSnapshot, BaseValidator
from flora_server.engine.protocol import GenerationEngine
from flora_server.metrics import ServerMetrics
from flora_server.settings import Settings

log = logging.getLogger(__name__)


def load_base(settings: Settings) -> Any:
    """`flora.models.load` with the settings' device and dtype (blocking)."""
    import torch

    from flora import models

    device = settings.device
    if settings.dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        dtype = getattr(torch, settings.dtype)
    return models.load(settings.model, device=device, dtype=dtype, home=settings.home)


def _engine_settings(settings: Settings, metrics: ServerMetrics) -> dict[str, Any]:
    """The keyword arguments every engine takes from the server's settings."""
    return {
        "max_batch_size": settings.max_batch_size,
        "max_queue": settings.max_queue,
        "max_slots": settings.max_slots,
        "host_cache_bytes": settings.host_cache_bytes,
        "factor_dtype": settings.factor_dtype,
        "metrics": metrics,
    }


def text_engine(loaded: Any, settings: Settings) -> str:
    """The text engine to build: `settings.engine`, except that a model engine v2 cannot
    serve (`paged.windows.attention_windows`: e.g. linear-attention layers, attention
    soft-capping or sinks) falls back to v1 when the engine was left at its default; asking
    for v2 explicitly on such a model is a start-up error."""
    if settings.engine != "v2":
        return settings.engine
    from flora_server.engine.paged.windows import attention_windows

    try:
        attention_windows(loaded.model)
    except ValueError as exc:
        if "engine" in settings.model_fields_set:  # --engine v2 or FLORA_ENGINE=v2
            raise ValueError(f"{exc}; serve {loaded.name} with --engine v1") from exc
        log.info("%s: %s; serving it with engine v1", loaded.name, exc)
        return "v1"
    return "v2"


def llm_engine(
    loaded: Any, settings: Settings, registry: AdapterRegistry, metrics: ServerMetrics
) -> Any:
    from flora_server.engine.llm_engine import LLMEngine

    common = {"max_new_tokens_cap": settings.max_new_tokens, **_engine_settings(settings, metrics)}
    if text_engine(loaded, settings) == "v2":
        from flora_server.engine.paged.engine import PagedLLMEngine

        return PagedLLMEngine(
            loaded,
            registry,
            kv_cache_bytes=settings.kv_cache_bytes,
            kv_block_size=settings.kv_block_size,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            prefix_caching=settings.prefix_caching,
            cuda_graphs=settings.cuda_graphs,
            **common,
        )
    return LLMEngine(loaded, registry, **common)


def batch_engine(
    loaded: Any, settings: Settings, registry: AdapterRegistry, metrics: ServerMetrics
) -> Any:
    """The image-classifier or text-encoder engine (one forward per batch)."""
    from flora_server.engine.encoder import EncoderEngine
    from flora_server.engine.vision import VisionEngine

    engine_class = VisionEngine if loaded.kind == "image-classifier" else EncoderEngine
    return engine_class(
        loaded,
        registry,
        max_wait=settings.batch_wait_ms / 1000,
        **_engine_settings(settings, metrics),
    )


# Model kind -> the engine that serves it.
ENGINE_BUILDERS: dict[str, Callable[[Any, Settings, AdapterRegistry, ServerMetrics], Any]] = {
    "causal-lm": llm_engine,
    "image-classifier": batch_engine,
    "text-encoder": batch_engine,
}


def build_engine(
    settings: Settings, registry: AdapterRegistry, metrics: ServerMetrics
) -> tuple[GenerationEngine, AdapterValidator]:
    """The real engine for the kind of `settings.model` (the default factory)."""
    from flora.models.types import a_kind

    loaded = load_base(settings)
    builder = ENGINE_BUILDERS.get(loaded.kind)
    if builder is None:
        raise RuntimeError(
            f"{settings.model} is {a_kind(loaded.kind)} model; this server serves "
            f"{', '.join(ENGINE_BUILDERS)}"
        )
    base = BaseSnapshot.of(loaded)  # before the engine can merge an adapter or swap a head
    engine = builder(loaded, settings, registry, metrics)
    # What the engine can serve (heads, folded updates) is checked at upload too.
    return engine, BaseValidator(base, engine.check_adapter)
