"""`/health` (alive), `/ready` (base loaded and warmed), `/metrics` (Prometheus)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from flora_server.api.deps import (
    MaybeEngineDep,
    MetricsDep,
    is_draining,
    require_metrics_access,
)
from flora_server.errors import error_body
from flora_server.schemas.common import PROBE_503_RESPONSES

router = APIRouter(tags=["health"])


@router.get(
    "/health",
    summary="Liveness: the process and its engine thread are alive",
    responses=PROBE_503_RESPONSES,
)
async def health(engine: MaybeEngineDep) -> JSONResponse:
    # Never waits on the engine: a busy engine is alive. Only a dead worker thread is not.
    if engine is not None and not engine.healthy:
        return JSONResponse(error_body("engine_dead", "the engine worker stopped"), 503)
    return JSONResponse({"status": "ok"})


@router.get(
    "/ready",
    summary="Readiness: 503 until the base model is loaded and warmed",
    responses=PROBE_503_RESPONSES,
)
async def ready(request: Request, engine: MaybeEngineDep) -> JSONResponse:
    state = request.app.state
    if is_draining(request):
        return JSONResponse(
            error_body("service_unavailable", "shutting down"), 503, headers={"Retry-After": "1"}
        )
    if engine is None or not engine.ready or not state.warmed:
        message = f"start-up failed: {state.startup_error}" if state.startup_error else "loading"
        return JSONResponse(
            error_body("service_unavailable", message), 503, headers={"Retry-After": "1"}
        )
    body: dict[str, Any] = {"status": "ready", "model": engine.model_name}
    return JSONResponse(body)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    dependencies=[Depends(require_metrics_access)],
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
async def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
