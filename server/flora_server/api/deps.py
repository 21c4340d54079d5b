"""Typed dependencies: everything a handler needs comes from `app.state`, set by `create_app`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from flora.models.types import a_kind
from flora_server import auth
from flora_server.adapters.registry import AdapterRegistry
from flora_server.engine.batch_engine import BatchEngine
from flora_server.engine.protocol import EngineNotReadyError, GenerationEngine
from flora_server.errors import APIError
from flora_server.metrics import ServerMetrics
from flora_server.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="an inference or admin key")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_registry(request: Request) -> AdapterRegistry:
    return request.app.state.registry


def get_metrics(request: Request) -> ServerMetrics:
    return request.app.state.metrics


def get_engine(request: Request) -> GenerationEngine:
    """The engine once the base is loaded and warmed; 503 before that."""
    engine: GenerationEngine | None = request.app.state.engine
    if is_draining(request):
        raise EngineNotReadyError("the server is shutting down")
    if engine is None or not engine.ready or not request.app.state.warmed:
        error = request.app.state.startup_error
        raise EngineNotReadyError(
            f"the model failed to load: {error}" if error else "the model is still loading"
        )
    return engine


def is_draining(request: Request) -> bool:
    """True once SIGTERM was received (`flora_server.lifecycle`): new work is refused."""
    return bool(getattr(request.app.state, "draining", False))


async def adapter_change(request: Request) -> AsyncIterator[None]:
    """Adapter management routes: a change (any method but GET/HEAD: an upload, a delete, a
    load or unload) is refused with 503 once the server drains, so the client retries on
    another replica; while one runs it is counted (`app.state.changes_in_flight`) so that
    the drain waits for it (`lifecycle.in_flight`) instead of cutting a store write."""
    if request.method in ("GET", "HEAD"):
        yield
        return
    if is_draining(request):
        raise EngineNotReadyError("the server is shutting down: adapter changes go elsewhere")
    state = request.app.state
    state.changes_in_flight += 1
    try:
        yield
    finally:
        state.changes_in_flight -= 1


def get_engine_or_none(request: Request) -> GenerationEngine | None:
    return request.app.state.engine


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[AdapterRegistry, Depends(get_registry)]
MetricsDep = Annotated[ServerMetrics, Depends(get_metrics)]
EngineDep = Annotated[GenerationEngine, Depends(get_engine)]
MaybeEngineDep = Annotated[GenerationEngine | None, Depends(get_engine_or_none)]
CredentialsDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _presented_key(
    settings: Settings, credentials: HTTPAuthorizationCredentials | None
) -> auth.ApiKey:
    if credentials is None or not credentials.credentials:
        raise APIError(
            401,
            "missing API key (Authorization: Bearer ...)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    keys = auth.configured_keys(
        tuple(settings.api_keys), tuple(settings.admin_keys), tuple(settings.metrics_keys)
    )
    key = auth.identify(credentials.credentials, keys)
    if key is None:
        raise APIError(401, "unknown API key", headers={"WWW-Authenticate": "Bearer"})
    return key


# Async on purpose: an async dependency runs in the request's own task context, so the
# principal it sets is what `auth.visible` reads in the handler.
async def require_inference_key(settings: SettingsDep, credentials: CredentialsDep) -> None:
    """Inference routes: any inference or admin key when keys are configured."""
    if settings.auth_enabled:
        key = _presented_key(settings, credentials)
        if key.role == "metrics":
            raise APIError(403, auth.METRICS_KEY_ONLY)
        auth.set_principal(auth.Principal(key.role, key.tenant))
    else:
        auth.set_principal(auth.OPEN)


async def require_admin_key(settings: SettingsDep, credentials: CredentialsDep) -> None:
    """Adapter management: an admin key when keys are configured (403 for inference keys)."""
    if not settings.auth_enabled:
        auth.set_principal(auth.OPEN)
        return
    key = _presented_key(settings, credentials)
    if key.role != "admin":
        raise APIError(403, "this route needs an admin key")
    auth.set_principal(auth.Principal(key.role, key.tenant))


async def require_metrics_access(settings: SettingsDep, credentials: CredentialsDep) -> None:
    """`/metrics`: open on a server without keys (or with `metrics_public`, which settings
    refuse while tenants exist); else a metrics key or an admin key without a tenant."""
    if settings.metrics_public or not (settings.auth_enabled or settings.metrics_keys):
        return
    key = _presented_key(settings, credentials)
    if not auth.may_read_metrics(key):
        raise APIError(
            403,
            "/metrics needs a metrics key or an admin key bound to no tenant "
            "(its labels name every tenant's adapters)",
        )


def require_kind(*kinds: str, neutral_paths: frozenset[str] = frozenset()) -> Callable[..., None]:
    """A router dependency: 404 naming the loaded model kind when the route needs another
    kind (`/v1/embeddings` on an LLM server, `/generate` on an image classifier). Paths in
    `neutral_paths` are served for every kind. Before the model is loaded the handlers
    answer 503 as usual."""

    def check(request: Request) -> None:
        engine = request.app.state.engine
        if engine is None or engine.kind in kinds:
            return
        if getattr(request.scope.get("route"), "path", None) in neutral_paths:
            return
        raise APIError(
            404,
            f"{request.url.path} is not served here: the loaded model {engine.model_name!r} is "
            f"{a_kind(engine.kind)} model "
            f"(this route needs {' or '.join(map(a_kind, kinds))} model)",
        )

    return check


def get_batch_engine(request: Request) -> BatchEngine:
    """The image or encoder engine (ready); 503 before that."""
    return get_engine(request)  # type: ignore[return-value]


BatchEngineDep = Annotated[BatchEngine, Depends(get_batch_engine)]
