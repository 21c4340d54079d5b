"""The app factory. `create_app(settings)` builds a FastAPI app; nothing is built at import.

Start-up (lifespan): the store and registry are ready at once, so `/health` answers and
uploads can be listed; the base model is loaded in a background thread (the engine factory),
the engine started and warmed, `--adapter` directories registered and, with `--preload`,
every stored adapter run once so it sits in the caches. `/ready` turns 200 after that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI

from flora_server.adapters.freshness import StoreRechecker
from flora_server.adapters.registry import (
    AdapterRegistry,
    AdapterValidationError,
    AdapterValidator,
)
from flora_server.adapters.stores import open_store
from flora_server.api import adapters, classify, embeddings, generate, health, openai
from flora_server.api.deps import require_inference_key, require_kind
from flora_server.engine.protocol import GenerationEngine, GenerationRequest, SamplingParams
from flora_server.errors import install_error_handlers
from flora_server.guards import RequestGuardMiddleware
from flora_server.metrics import ServerMetrics
from flora_server.settings import Settings, parse_adapter_spec

if TYPE_CHECKING:
    from flora.adapter import Adapter

logger = logging.getLogger(__name__)

EngineFactory = Callable[
    [Settings, AdapterRegistry, ServerMetrics], tuple[GenerationEngine, AdapterValidator]
]
"""Loads the base (blocking; runs in a thread) and returns an unstarted engine plus the
validator that checks adapter files against that base."""


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


def llm_engine(
    loaded: Any, settings: Settings, registry: AdapterRegistry, metrics: ServerMetrics
) -> Any:
    from flora_server.engine.worker import LLMEngine

    return LLMEngine(
        loaded,
        registry,
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        max_slots=settings.max_slots,
        host_cache_bytes=settings.host_cache_bytes,
        max_new_tokens_cap=settings.max_new_tokens,
        metrics=metrics,
    )


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
        max_slots=settings.max_slots,
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        host_cache_bytes=settings.host_cache_bytes,
        max_wait=settings.batch_wait_ms / 1000,
        metrics=metrics,
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
    from flora.fingerprint import describe_base

    loaded = load_base(settings)
    builder = ENGINE_BUILDERS.get(loaded.kind)
    if builder is None:
        raise RuntimeError(
            f"{settings.model} is a {loaded.kind} model; this server serves "
            f"{', '.join(ENGINE_BUILDERS)}"
        )
    # Computed once, before the engine can merge an adapter into the weights or swap heads.
    validator = BaseValidator(describe_base(loaded.model), loaded.fingerprint, loaded)
    engine = builder(loaded, settings, registry, metrics)
    # What the engine itself can serve (heads, whole-saved modules) is checked at upload too.
    validator.engine_check = getattr(engine, "check_adapter", None) or _per_row_servable
    return engine, validator


def _per_row_servable(adapter: Adapter) -> None:
    """The LLM engine's rules (flora.serving): no modules saved whole, and an update that
    stays finite once folded into the slot factors (ValueError)."""
    from flora_server.engine.runtime import check_finite_update

    check_finite_update(adapter)  # reads the modules (refusing whole-saved ones) first


build_llm_engine = build_engine  # the name older callers use


class BaseValidator:
    """Reads an adapter file with `flora.load_adapter` and checks it against the base's module
    table and fingerprint (flora errors become `AdapterValidationError`)."""

    def __init__(
        self,
        specs: dict[str, Any],
        fingerprint: str,
        loaded: Any,
        engine_check: Callable[[Adapter], None] | None = None,
    ) -> None:
        from torch import nn

        self.specs = specs
        self.fingerprint = fingerprint
        self._loaded = loaded
        self._partial: dict[tuple[str, ...], str] = {}
        # `engine_check(adapter)` raises ValueError for what the engine cannot serve.
        self.engine_check = engine_check
        # Snapshot of the pristine base (engines may swap modules, e.g. the vision head).
        self._shapes = {k: tuple(v.shape) for k, v in loaded.model.state_dict().items()}
        self._linear = {n for n, m in loaded.model.named_modules() if isinstance(m, nn.Linear)}

    def _fingerprint_for(self, train_modules: list[str] | str) -> str:
        # An adapter that retrains whole modules carries the fingerprint of the base minus
        # those modules; compute it from the pristine weights file (never from the live
        # model, whose weights may have an adapter merged in).
        if not train_modules:
            return self.fingerprint
        key = (train_modules,) if isinstance(train_modules, str) else tuple(train_modules)
        if key not in self._partial:
            from flora.adapter.io import trained_module_names
            from flora.fingerprint import base_fingerprint
            from flora.models import canonical_state_dict

            names = trained_module_names(self._loaded.model, train_modules)
            prefixes = tuple(n + "." for n in names)
            # keyed like the live model, tied copies (lm_head) filled in, as training hashes it
            state = canonical_state_dict(self._loaded)
            self._partial[key] = base_fingerprint(
                {k: v for k, v in state.items() if not k.startswith(prefixes)}
            )
        return self._partial[key]

    def __call__(self, path: Path) -> Adapter:
        from flora.adapter import load_adapter, validate_against
        from flora.errors import AdapterError

        try:
            adapter = load_adapter(path)
            # Whole-saved modules first: the fingerprint leaves them out, and the message
            # names the module and shapes.
            self.check_full_shapes(adapter)
            if self.engine_check is not None:
                self.engine_check(adapter)
            validate_against(
                adapter, self.specs, self._fingerprint_for(adapter.config.train_modules)
            )
        except (AdapterError, ValueError) as exc:
            raise AdapterValidationError(str(exc)) from exc
        return adapter

    def check_full_shapes(self, adapter: Adapter) -> None:
        """Modules saved whole (`full.<module>.<param>`) must fit the base module they
        replace: the same parameters and shapes, except that a Linear may change its number
        of outputs (a new head with other classes: weight [C', F] with the base's F, bias
        [C']). A module the base lacks is left to the engine's check. Raises ValueError.
        The fingerprint leaves these modules out, so nothing else catches a misfit."""
        for module in adapter.full_modules():
            prefix = module + "."
            base = {k[len(prefix) :]: v for k, v in self._shapes.items() if k.startswith(prefix)}
            if not base:
                continue
            state = adapter.full_state(module)
            for param, tensor in sorted(state.items()):
                where = f"full.{module}.{param}"
                shape = tuple(tensor.shape)
                if param not in base:
                    raise ValueError(f"{where}: the base's {module!r} has no parameter {param!r}")
                if module in self._linear and param in ("weight", "bias"):
                    outputs = state["weight"].shape[0] if "weight" in state else base["weight"][0]
                    want = (outputs, base["weight"][1]) if param == "weight" else (outputs,)
                else:
                    want = base[param]
                if shape != tuple(want):
                    raise ValueError(
                        f"{where} has shape {list(shape)}, the base's {module!r} needs "
                        f"{list(want)}"
                        + (
                            " (only the number of outputs may differ)"
                            if module in self._linear
                            else ""
                        )
                    )


async def _start_engine(app: FastAPI, factory: EngineFactory) -> None:
    state = app.state
    settings: Settings = state.settings
    try:
        engine, validator = await asyncio.to_thread(
            factory, settings, state.registry, state.metrics
        )
        state.registry.set_validator(validator)
        for spec in settings.adapters:
            adapter_id, directory = parse_adapter_spec(spec)
            result = await asyncio.to_thread(
                state.registry.register_directory, adapter_id, directory
            )
            logger.info("adapter %s from %s: %s", adapter_id, directory, result.status)
        engine.start()
        state.engine = engine
        # Deletes and overwrites made through other replicas reach this one's caches here.
        state.rechecker = StoreRechecker(
            state.registry, settings.store_recheck_seconds, engine.invalidate_adapter
        )
        state.rechecker.start()
        state.metrics.bind_engine_stats(engine.stats)
        while not engine.ready:  # the worker warms up before it reports ready
            if not engine.healthy:
                raise RuntimeError("the engine stopped during warm-up")
            await asyncio.sleep(0.05)
        if settings.preload:
            await _preload(engine, state.registry)
        state.warmed = True
        logger.info("ready: %s on %s", engine.model_name, settings.device)
    except Exception as exc:
        logger.exception("start-up failed")
        state.startup_error = f"{type(exc).__name__}: {exc}"


async def _preload(engine: GenerationEngine, registry: AdapterRegistry) -> None:
    """One one-token request per stored adapter pulls it through the caches."""
    ids = await asyncio.to_thread(registry.list_ids)
    if hasattr(engine, "preload"):  # image/encoder engines: no prompt needed
        for adapter_id in ids[: engine.max_slots]:
            try:
                await engine.preload(adapter_id)
            except Exception as exc:
                logger.warning("preloading %s failed: %s", adapter_id, exc)
        return
    prompt = await engine.tokenize("Hello")
    for adapter_id in ids[: engine.max_slots]:
        request = GenerationRequest(
            f"preload-{adapter_id}", prompt, SamplingParams(max_new_tokens=1), adapter_id
        )
        try:
            async for _ in engine.generate(request):
                pass
        except Exception as exc:
            logger.warning("preloading %s failed: %s", adapter_id, exc)


def create_app(settings: Settings, *, engine_factory: EngineFactory | None = None) -> FastAPI:
    """Build the app for `settings`. `engine_factory` defaults to the real LLM engine; tests
    pass a fake one."""
    factory = engine_factory or build_engine

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_start_engine(app, factory))
        app.state.startup_task = task
        try:
            yield
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            if app.state.rechecker is not None:
                app.state.rechecker.stop()
            engine: GenerationEngine | None = app.state.engine
            if engine is not None:
                await engine.shutdown(settings.shutdown_timeout)

    app = FastAPI(
        title="flora-serve",
        version="0.1.0",
        summary="Many FLoRA adapters on one base model: TGI/LoRAX and OpenAI shaped APIs.",
        lifespan=lifespan,
    )
    store = open_store(settings)
    app.state.settings = settings
    app.state.metrics = ServerMetrics(settings.metrics_top_adapters)
    # Staged uploads live beside the store (same filesystem; ignored by its listing).
    # A remote store answers `exists` (asked on every request) with a round trip: reuse
    # answers for a fraction of the recheck bound. A directory is asked every time.
    exists_ttl = 0.0 if settings.adapter_store_url is None else settings.store_recheck_seconds / 2
    app.state.registry = AdapterRegistry(
        store, settings.adapter_store_dir / ".uploads", exists_ttl=exists_ttl
    )
    app.state.rechecker = None
    app.state.engine = None
    app.state.warmed = False
    app.state.startup_error = None

    install_error_handlers(app)
    # Outermost last: metrics also count the guard's 401/413 answers.
    app.add_middleware(RequestGuardMiddleware, settings=settings)
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.metrics)
    for module in (health, adapters):
        app.include_router(module.router)

    # Inference routes answer 404 naming the loaded kind when they belong to another kind,
    # but only after the key check: include_router's dependencies run before the router's
    # own, and without a key even the loaded kind is not disclosed (401 first; FastAPI
    # runs the routers' repeated `require_inference_key` once per request).
    def kind(*kinds: str, **kw: frozenset[str]) -> list[Any]:
        return [Depends(require_inference_key), Depends(require_kind(*kinds, **kw))]

    lm = kind("causal-lm", neutral_paths=frozenset({"/v1/models"}))
    app.include_router(generate.router, dependencies=lm)
    app.include_router(openai.router, dependencies=lm)
    app.include_router(embeddings.router, dependencies=kind("text-encoder"))
    app.include_router(classify.router, dependencies=kind("image-classifier", "text-encoder"))
    return app


class RequestMetricsMiddleware:
    """Counts requests by route template and status (pure ASGI, so streaming and client
    disconnects pass through untouched)."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        status = 500

        async def send_wrapper(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            # The route template, not the raw path: ids in paths must not become labels.
            path = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.http_requests.labels(path, scope["method"], str(status)).inc()
            self.metrics.http_latency.labels(path).observe(time.monotonic() - start)
