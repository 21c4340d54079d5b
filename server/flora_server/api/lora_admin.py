"""vLLM's runtime LoRA routes: `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter`.

`lora_path` is a directory on the server, inside `--lora-dirs`, holding a PEFT LoRA or a
FLoRA adapter (or a single `.flora` file). Loading validates and stores it under
`lora_name` like an upload, so `model=<lora_name>` then serves it; unloading removes it
from the store, as `DELETE /v1/adapters/{id}` does. Both need an admin key when keys are
configured. Answers follow vLLM: plain-text success, 400 for a bad request or a name
already loaded (unless `load_inplace`), 404 for unloading an unknown name.
"""

from __future__ import annotations

import functools

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict

from flora_server import auth
from flora_server.adapters.local_source import LocalPathError, confined_path, register_local
from flora_server.adapters.registry import (
    AdapterConflictError,
    AdapterValidationError,
    BaseNotLoadedError,
)
from flora_server.api.adapters import base_loading
from flora_server.api.deps import MaybeEngineDep, RegistryDep, SettingsDep, adapter_change
from flora_server.api.deps import require_admin_key as _auth
from flora_server.errors import APIError
from flora_server.schemas.common import ERROR_RESPONSES, ErrorResponse
from flora_server.settings import is_valid_adapter_id

router = APIRouter(
    prefix="/v1", tags=["adapters"], dependencies=[Depends(_auth), Depends(adapter_change)]
)
_RESPONSES: dict[int | str, dict[str, object]] = {
    **ERROR_RESPONSES,
    400: {"model": ErrorResponse, "description": "a bad path or name, or already loaded"},
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "done"},
}


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str
    lora_int_id: int | None = None


def _check_name(name: str) -> None:
    if not is_valid_adapter_id(name):
        raise APIError(
            400,
            f"lora_name {name!r} must match ^[A-Za-z0-9][A-Za-z0-9._-]{{0,127}}$ and "
            "contain no '..'",
            param="lora_name",
        )
    if not auth.visible(name):
        tenant = auth.current_principal().tenant
        raise APIError(403, f"adapter ids of tenant {tenant!r} start with '{tenant}.'")


@router.post(
    "/load_lora_adapter",
    summary="Load a LoRA (PEFT or FLoRA) from an allowed server directory (vLLM shape)",
    responses=_RESPONSES,
)
async def load_lora_adapter(
    body: LoadLoRAAdapterRequest,
    registry: RegistryDep,
    settings: SettingsDep,
    engine: MaybeEngineDep,
) -> PlainTextResponse:
    _check_name(body.lora_name)
    if not registry.can_validate:
        raise base_loading()
    try:
        real = confined_path(body.lora_path, settings.lora_dirs)
    except LocalPathError as exc:
        raise APIError(404 if exc.missing else 400, str(exc), param="lora_path") from None
    if not body.load_inplace and await registry.call(registry.exists, body.lora_name):
        raise APIError(
            400, f"The lora adapter '{body.lora_name}' has already been loaded.", param="lora_name"
        )
    try:
        result = await registry.call(
            functools.partial(register_local, overwrite=body.load_inplace),
            registry,
            body.lora_name,
            real,
            bounded=False,  # an upload: the transfer is not bounded, the wait for a thread is
        )
    except (AdapterValidationError, LocalPathError) as exc:
        raise APIError(
            422, f"invalid adapter: {exc}", type="invalid_adapter", param="lora_path"
        ) from None
    except AdapterConflictError as exc:  # loaded concurrently by another request
        raise APIError(400, str(exc), param="lora_name") from None
    if result.status == "replaced" and engine is not None:
        engine.invalidate_adapter(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post(
    "/unload_lora_adapter",
    summary="Remove a LoRA adapter (vLLM shape)",
    responses=_RESPONSES,
)
async def unload_lora_adapter(
    body: UnloadLoRAAdapterRequest, registry: RegistryDep, engine: MaybeEngineDep
) -> PlainTextResponse:
    _check_name(body.lora_name)
    try:
        deleted = await registry.call(registry.delete, body.lora_name)
    except BaseNotLoadedError:
        raise base_loading() from None
    if not deleted:
        raise APIError(
            404, f"The lora adapter '{body.lora_name}' cannot be found.", param="lora_name"
        )
    if engine is not None:
        engine.invalidate_adapter(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
