"""Typed dependencies: everything a handler needs comes from `app.state`, set by `create_app`."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from flora_server.adapters.registry import AdapterRegistry
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
    if engine is None or not engine.ready or not request.app.state.warmed:
        error = request.app.state.startup_error
        raise EngineNotReadyError(
            f"the model failed to load: {error}" if error else "the model is still loading"
        )
    return engine


def get_engine_or_none(request: Request) -> GenerationEngine | None:
    return request.app.state.engine


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[AdapterRegistry, Depends(get_registry)]
MetricsDep = Annotated[ServerMetrics, Depends(get_metrics)]
EngineDep = Annotated[GenerationEngine, Depends(get_engine)]
MaybeEngineDep = Annotated[GenerationEngine | None, Depends(get_engine_or_none)]
CredentialsDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _matches(key: str, keys: list[str]) -> bool:
    # Constant-time comparison against every key so timing does not reveal a prefix.
    found = False
    for candidate in keys:
        found |= hmac.compare_digest(key.encode(), candidate.encode())
    return found


def _presented_key(settings: Settings, credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or not credentials.credentials:
        raise APIError(
            401,
            "missing API key (Authorization: Bearer ...)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    key = credentials.credentials
    if not (_matches(key, settings.api_keys) or _matches(key, settings.admin_keys)):
        raise APIError(401, "unknown API key", headers={"WWW-Authenticate": "Bearer"})
    return key


def require_inference_key(settings: SettingsDep, credentials: CredentialsDep) -> None:
    """Inference routes: any inference or admin key when keys are configured."""
    if settings.auth_enabled:
        _presented_key(settings, credentials)


def require_admin_key(settings: SettingsDep, credentials: CredentialsDep) -> None:
    """Adapter management: an admin key when keys are configured (403 for inference keys)."""
    if not settings.auth_enabled:
        return
    key = _presented_key(settings, credentials)
    if not _matches(key, settings.admin_keys):
        raise APIError(403, "this route needs an admin key")


def require_metrics_access(settings: SettingsDep, credentials: CredentialsDep) -> None:
    if settings.auth_enabled and not settings.metrics_public:
        _presented_key(settings, credentials)
