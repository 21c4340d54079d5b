"""The app factory. `create_app(settings)` builds a FastAPI app; nothing is built at import.

Start-up (lifespan): the store and registry are ready at once, so `/health` answers and
uploads can be listed; the base model is loaded in a background thread (the engine factory),
the engine started and warmed, `--adapter` directories registered and, with `--preload`,
every stored adapter run once so it sits in the caches. `/ready` turns 200 after that.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Depends, FastAPI
from starlette.requests import ClientDisconnect

from flora_server.adapters.freshness import StoreRechecker
from flora_server.adapters.open_store import open_store
from flora_server.adapters.registry import (
    AdapterRegistry,
    AdapterValidator,
)
from flora_server.adapters.staging import UPLOADS_DIR, StagingBudget, StagingJanitor
from flora_server.api import (
    adapters,
    classify,
    embeddings,
    generate,
    health,
    lora_admin,
    openai,
    tgi,
)
from flora_server.api.deps import require_inference_key, require_kind
from flora_server.api.tgi_errors import FlatErrorMiddleware
from flora_server.bootstrap import build_engine
from flora_server.engine.protocol import GenerationEngine, GenerationRequest, SamplingParams
from flora_server.errors import install_error_handlers
from flora_server.guards import RequestGuardMiddleware
from flora_server.metrics import ServerMetrics
from flora_server.observability import RequestContextMiddleware, method_label, route_template
from flora_server.settings import Settings, parse_adapter_spec
from flora_server.tracing import build_tracing

logger = logging.getLogger(__name__)

EngineFactory = Callable[
    [Settings, AdapterRegistry, ServerMetrics], tuple[GenerationEngine, AdapterValidator]
]
"""Loads the base (blocking; runs in a thread) and returns an unstarted engine plus the
validator that checks adapter files against that base."""


async def _start_engine(app: FastAPI, factory: EngineFactory) -> None:
    state = app.state
    settings: Settings = state.settings
    try:
        engine, validator = await asyncio.to_thread(
            factory, settings, state.registry, state.metrics
        )
        if settings.served_model_name:  # the name clients use for the base (vLLM's flag)
            engine.model_name = settings.served_model_name
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
        state.metrics.bind_engine_stats(engine.stats, engine.model_name)
        while not engine.ready:  # the worker warms up before it reports ready
            if not engine.healthy:
                raise RuntimeError("the engine stopped during warm-up")
            await asyncio.sleep(0.05)
        if settings.preload:
            await _preload(engine, state.registry)
        if settings.gc_freeze:
            await asyncio.to_thread(freeze_startup_heap)
        state.warmed = True
        logger.info("ready: %s on %s", engine.model_name, settings.device)
    except Exception as exc:
        logger.exception("start-up failed")
        state.startup_error = f"{type(exc).__name__}: {exc}"


def freeze_startup_heap() -> None:
    """Take what start-up built (the model's modules and parameters, the tokenizer, the
    imported libraries: hundreds of thousands of objects) out of the cyclic garbage
    collector's reach (`gc.freeze`, as vLLM does once its engine is up). A full collection
    walks every tracked object, and it stops every thread while it does, the engine's step
    thread included: with the start-up heap in it, each one is a pause in every running
    stream (docs/server.md, "Garbage collection"). Collected first, so nothing frozen is
    garbage already; what requests create afterwards is collected as usual."""
    gc.collect()
    gc.freeze()
    logger.info("garbage collector: %d start-up objects frozen", gc.get_freeze_count())


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
    """Build the app for `settings`. `engine_factory` defaults to `build_engine`, which
    builds the engine for the base's kind (LLM, text encoder or image classifier); tests
    pass a fake one."""
    factory = engine_factory or build_engine

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Leftovers of a crash (staged uploads, temp files) go before anything is served.
        janitor = StagingJanitor(settings.adapter_store_dir, settings.staging_stale_seconds)
        await asyncio.to_thread(janitor.sweep)
        janitor.start()
        task = asyncio.create_task(_start_engine(app, factory))
        app.state.startup_task = task
        try:
            yield
        finally:
            janitor.stop()
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            if app.state.rechecker is not None:
                app.state.rechecker.stop()
            engine: GenerationEngine | None = app.state.engine
            if engine is not None:
                await engine.shutdown(settings.shutdown_timeout)
            # Queued store calls are dropped; a running one ends by the S3 client's timeouts.
            app.state.registry.store.executor.shutdown()

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
        store, settings.adapter_store_dir / UPLOADS_DIR, exists_ttl=exists_ttl
    )
    app.state.staging_budget = StagingBudget(settings.max_staging_bytes)
    app.state.rechecker = None
    app.state.engine = None
    app.state.warmed = False
    app.state.startup_error = None
    app.state.changes_in_flight = 0  # adapter changes running (`deps.adapter_change`)
    app.state.tracing = build_tracing(settings.otel_endpoint)

    install_error_handlers(app)
    # Outermost last: metrics also count the guard's 401/413 answers.
    app.add_middleware(RequestGuardMiddleware, settings=settings)
    app.add_middleware(FlatErrorMiddleware)  # TGI routes' error shape, guards' answers too
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.metrics)
    # Outermost: every answer carries X-Request-Id, and the access log sees every request.
    app.add_middleware(RequestContextMiddleware)
    for module in (health, adapters, lora_admin):
        app.include_router(module.router)

    # Inference routes answer 404 naming the loaded kind when they belong to another kind,
    # but only after the key check: include_router's dependencies run before the router's
    # own, and without a key even the loaded kind is not disclosed (401 first; FastAPI
    # runs the routers' repeated `require_inference_key` once per request).
    def kind(*kinds: str, **kw: frozenset[str]) -> list[Any]:
        return [Depends(require_inference_key), Depends(require_kind(*kinds, **kw))]

    lm = kind("causal-lm", neutral_paths=frozenset({"/v1/models"}))
    app.include_router(generate.router, dependencies=lm)
    app.include_router(tgi.router, dependencies=lm)
    app.include_router(openai.router, dependencies=lm)
    app.include_router(embeddings.router, dependencies=kind("text-encoder"))
    app.include_router(classify.router, dependencies=kind("image-classifier", "text-encoder"))
    return app


class RequestMetricsMiddleware:
    """Counts requests by route template and status (pure ASGI, so streaming passes through
    untouched).

    A client that goes away while its body is read (an abandoned upload) is not a server
    error: it is logged in one line, counted in `flora_client_disconnects_total{route}` and
    not in the status counts; no answer can reach it anyway."""

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

        # The route template, not the raw path: ids in paths must not become labels.
        try:
            await self.app(scope, receive, send_wrapper)
        except ClientDisconnect:
            path = route_template(scope)
            logger.info(
                "client disconnected during %s %s: request abandoned", scope["method"], path
            )
            self.metrics.client_disconnects.labels(path).inc()
            return
        except BaseException:
            self._count(scope, status, start)  # 500 unless the response had started
            raise
        self._count(scope, status, start)

    def _count(self, scope: Any, status: int, start: float) -> None:
        path = route_template(scope)
        self.metrics.http_requests.labels(path, method_label(scope), str(status)).inc()
        self.metrics.http_latency.labels(path).observe(time.monotonic() - start)
