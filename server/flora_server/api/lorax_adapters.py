"""Which adapter a `/generate` request runs: LoRAX's `adapter_id` + `adapter_source`, or a
per-request merge (`merged_adapters`, also accepted under its router name
`adapter_parameters`). Derived adapters are made and cached by `adapters/derived.py`."""

from __future__ import annotations

from flora_server import auth
from flora_server.adapters.derived import (
    InputChangedError,
    build_merge,
    merged_id,
    register_local_derived,
)
from flora_server.adapters.local_source import LocalPathError, confined_path
from flora_server.adapters.registry import (
    AdapterConflictError,
    AdapterRegistry,
    AdapterValidationError,
)
from flora_server.adapters.store import StoredAdapterMissingError
from flora_server.api import engine_requests
from flora_server.errors import APIError, invalid_field
from flora_server.schemas.generate import GenerateParameters
from flora_server.schemas.structured import MergedAdapters
from flora_server.settings import Settings

_P = "parameters."


def _tenant_prefix() -> str:
    tenant = auth.current_principal().tenant
    return f"{tenant}." if tenant else ""


async def resolve_adapter(
    p: GenerateParameters, registry: AdapterRegistry, settings: Settings
) -> str | None:
    """The stored adapter id the engine should run (None: the base); 4xx naming the
    parameter for what cannot be served."""
    if p.merged_adapters is not None and p.adapter_parameters is not None:
        raise invalid_field(_P + "merged_adapters", "give merged_adapters or adapter_parameters")
    merge = p.merged_adapters or p.adapter_parameters
    if merge is not None:
        if p.adapter_id:
            raise invalid_field(_P + "merged_adapters", "give adapter_id or merged_adapters")
        return await _merged(merge, registry)
    source = p.adapter_source
    if source in ("hub", "pbase"):
        raise invalid_field(
            _P + "adapter_source",
            f"{source!r} needs network access, which this server does not have; upload the "
            "adapter (POST /v1/adapters) or use adapter_source 'local' with --lora-dirs",
        )
    if source == "local":
        if not p.adapter_id:
            raise invalid_field(_P + "adapter_id", "adapter_source 'local' needs a path")
        return await _local(p.adapter_id, registry, settings)
    # None or "s3": the adapter store (a directory or S3) resolves the id.
    await engine_requests.check_adapter(registry, p.adapter_id, _P + "adapter_id")
    return p.adapter_id


async def _local(path: str, registry: AdapterRegistry, settings: Settings) -> str:
    try:
        real = confined_path(path, settings.lora_dirs)
    except LocalPathError as exc:
        raise APIError(404 if exc.missing else 422, str(exc), param=_P + "adapter_id") from None
    try:
        # Unbounded: reads, validates and stores a local adapter (an upload, in effect).
        return await registry.call(
            register_local_derived, registry, real, _tenant_prefix(), bounded=False
        )
    except (AdapterValidationError, LocalPathError) as exc:
        raise APIError(
            422, f"invalid adapter: {exc}", type="invalid_adapter", param=_P + "adapter_id"
        ) from None


async def _merged(merge: MergedAdapters, registry: AdapterRegistry) -> str:
    from flora.errors import AdapterError

    param = _P + "merged_adapters"
    for adapter_id in merge.ids:
        await engine_requests.check_adapter(registry, adapter_id, param + ".ids")
    args = (merge.merge_strategy, merge.density, merge.majority_sign_method)
    try:
        adapter_id, shas = await registry.call(
            merged_id, registry, merge.ids, merge.weights, *args, _tenant_prefix()
        )
        if not await registry.call(registry.exists, adapter_id):
            # Unbounded: merges the inputs and stores the result (an upload, in effect).
            await registry.call(
                build_merge,
                registry,
                adapter_id,
                merge.ids,
                shas,
                merge.weights,
                *args,
                bounded=False,
            )
    except StoredAdapterMissingError as exc:
        raise APIError(404, f"adapter not found: {exc}", param=param + ".ids") from None
    except (AdapterError, AdapterValidationError) as exc:
        raise APIError(422, f"cannot merge: {exc}", type="invalid_adapter", param=param) from None
    except (InputChangedError, AdapterConflictError) as exc:
        raise APIError(409, str(exc), param=param) from None
    return adapter_id
