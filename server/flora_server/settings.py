"""Server settings: environment variables with the prefix `FLORA_`, each also a CLI flag.

`Settings()` reads the environment; `flora_server.cli` overlays the flags given on the command
line. Nothing here is instantiated at import time: `create_app(settings)` receives an instance.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The id rule lives in flora_server.ids; re-exported for the modules that import it here.
from flora_server.adapters import store_io
from flora_server.ids import ADAPTER_ID_PATTERN as ADAPTER_ID_PATTERN
from flora_server.ids import is_valid_adapter_id as is_valid_adapter_id
from flora_server.ids import parse_s3_url

_DEVICE_RE = re.compile(r"^(cpu|cuda|cuda:\d+|mps)$")
DEVICE_FORMS = "cpu, cuda, cuda:N or mps"  # what _DEVICE_RE accepts, for messages and help


def _split_csv(value: object) -> object:
    # Env vars hold lists as "a,b,c" (or JSON, which pydantic then parses).
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Everything `flora-serve` can be told. Env `FLORA_<NAME>`, flag `--<name-with-dashes>`."""

    model_config = SettingsConfigDict(
        env_prefix="FLORA_", extra="ignore", validate_default=True, populate_by_name=True
    )

    model: str = Field("smollm2-135m-instruct", description="zoo name or model directory")
    served_model_name: str | None = Field(
        None, description="name of the base model in the API (default: the model's own name)"
    )
    device: str = Field("cpu", description=DEVICE_FORMS)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="weights dtype; auto = bfloat16 on CUDA, float32 on CPU and MPS"
    )
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, ge=0, le=65535, description="port to bind (0: any free port)")
    home: Path = Field(
        Path("~/.cache/flora"), description="FLORA_HOME: converted models, adapters, caches"
    )
    adapter_store: str | None = Field(
        None,
        description="adapter store: a directory (default $FLORA_HOME/adapters; may be shared "
        "by replicas) or s3://bucket/prefix",
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3 endpoint for MinIO and other S3-compatibles (AWS: leave unset)"
    )
    s3_connect_timeout: float = Field(
        3.0, gt=0, le=300, description="S3 client: seconds to open a connection to the endpoint"
    )
    s3_read_timeout: float = Field(
        10.0,
        gt=0,
        le=600,
        description="S3 client: seconds one socket read may wait (a stalled endpoint fails a "
        "call instead of hanging it; not a cap on a whole transfer)",
    )
    s3_max_attempts: int = Field(
        3, ge=1, le=10, description="S3 client: attempts per call, the first one included"
    )
    store_timeout: float = Field(
        store_io.DEFAULT_TIMEOUT,
        gt=0,
        le=600,
        description="seconds a request waits for one adapter store call (a free store worker "
        "included; an upload's transfer excluded) before it is answered 503 + Retry-After",
    )
    store_workers: int = Field(
        store_io.DEFAULT_WORKERS,
        ge=1,
        le=256,
        description="threads for adapter store calls made by requests; a stalled store holds "
        "only these, never the threads other work needs",
    )
    store_recheck_seconds: float = Field(
        2.0,
        gt=0,
        le=3600,
        description="a replica rechecks cached adapters against the store this often; a "
        "delete or overwrite through another replica is honoured within this bound",
    )
    adapters: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="adapter directories to register at start: DIR or NAME=DIR (repeatable)",
    )
    preload: bool = Field(False, description="load every stored adapter into the caches at start")
    gc_freeze: bool = Field(
        True,
        description="once warm, freeze the start-up heap out of Python's garbage collector "
        "(shorter collection pauses while serving)",
    )
    lora_dirs: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="directories whose adapters (FLoRA or PEFT LoRA) /v1/load_lora_adapter "
        "and adapter_source=local may read (repeatable; empty: none)",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Bearer keys for inference routes, KEY or KEY:TENANT (empty: open)",
    )
    admin_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Bearer keys for /v1/adapters (also inference), KEY or KEY:TENANT",
    )
    metrics_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Bearer keys that may read /metrics and nothing else (for Prometheus)",
    )
    metrics_public: bool = Field(
        False,
        description="serve /metrics without a key even when keys are configured (refused "
        "when a key is bound to a tenant: the labels name every tenant's adapters)",
    )
    shutdown_timeout: float = Field(30.0, gt=0, description="seconds to drain on shutdown")
    request_timeout: float = Field(300.0, gt=0, description="seconds before a request is dropped")
    max_upload_bytes: int = Field(
        256 * 1024 * 1024, gt=0, description="largest adapter upload (body bytes)"
    )
    max_request_bytes: int = Field(
        8 * 1024 * 1024, gt=0, description="largest request body outside adapter uploads"
    )
    max_header_bytes: int = Field(
        16 * 1024, ge=1024, description="largest request line + headers (uvicorn h11)"
    )
    max_header_count: int = Field(100, ge=8, description="most HTTP headers in one request")
    max_connections: int = Field(
        1024, ge=1, description="open HTTP connections before uvicorn answers 503 itself"
    )
    header_timeout: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="seconds a client has to send a request line and headers, from connect "
        "or from the first byte of the next request on a kept-alive connection; then the "
        "connection is closed (slowloris)",
    )
    keep_alive_timeout: float = Field(
        5.0, gt=0, le=3600, description="seconds an idle kept-alive connection stays open"
    )
    probe_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="a second listener on this port that serves only /health and /ready, with "
        "its own connection cap, so probes answer while the main port is saturated",
    )
    max_staging_bytes: int = Field(
        1024 * 1024 * 1024,
        gt=0,
        description="bytes that uploads being received may hold in the staging directory "
        "at once; past it an upload answers 507 with Retry-After",
    )
    staging_stale_seconds: float = Field(
        3600.0,
        ge=1,
        description="staged upload parts and temp files untouched this long are leftovers of "
        "a crash: removed at start and by a sweep every stale/4 seconds (at most 5 min)",
    )
    max_queue: int = Field(256, ge=1, description="waiting requests before 429")
    max_batch_size: int = Field(32, ge=1, description="rows in the running batch")
    max_slots: int = Field(8, ge=1, description="adapters resident on the device at once")
    factor_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        # FLORA_ADAPTER_DTYPE (and the CLI's --adapter-dtype) still set it for older deployments.
        validation_alias=AliasChoices("flora_factor_dtype", "flora_adapter_dtype"),
        description="storage of adapter factors for linear layers served per row on a "
        "float32 CPU model: auto = the model's dtype; bfloat16 halves the bytes each "
        "distinct adapter in a batch costs per step (rounds the factors once)",
    )
    host_cache_bytes: int = Field(
        1024 * 1024 * 1024, ge=0, description="bytes of validated adapters kept in RAM"
    )
    max_new_tokens: int = Field(1024, ge=1, description="cap on tokens generated per request")
    default_max_new_tokens: int = Field(
        64, ge=1, description="max_new_tokens when /generate does not say"
    )
    max_stop_sequences: int = Field(8, ge=0, description="most stop sequences per request")
    max_stop_length: int = Field(64, ge=1, description="longest stop sequence (characters)")
    max_inputs_per_request: int = Field(
        32, ge=1, description="most images or texts in one /v1/classify or /v1/embeddings call"
    )
    max_image_pixels: int = Field(
        16_777_216, ge=1, description="largest image (width x height, read from its header)"
    )
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1, description="largest encoded image")
    batch_wait_ms: float = Field(
        5.0, ge=0, le=1000, description="image/encoder servers: ms to collect a batch"
    )
    metrics_top_adapters: int = Field(
        20, ge=0, description="adapters with their own metric label; the rest are `other`"
    )
    engine: Literal["v1", "v2"] = Field(
        "v2",
        description="text-generation engine: v2 = paged KV cache, chunked prefill, prefix "
        "caching by adapter content; v1 = left-padded batch. A model v2 cannot serve "
        "(full and sliding-window attention are served; e.g. attention soft-capping is not) "
        "gets v1 unless v2 was asked for (docs/engine.md)",
    )
    kv_cache_bytes: int = Field(
        1024 * 1024 * 1024,
        ge=1,
        description="engine v2: bytes of the KV block pool (keys and values of every layer), "
        "reserved at start; on the CPU only the blocks in use become resident",
    )
    kv_block_size: int = Field(16, ge=1, le=1024, description="engine v2: tokens per KV block")
    max_num_batched_tokens: int = Field(
        512, ge=1, description="engine v2: most tokens (decode + prefill chunks) in one step"
    )
    prefix_caching: bool = Field(
        True, description="engine v2: reuse KV blocks of identical prompt prefixes"
    )
    cuda_graphs: Literal["auto", "off"] = Field(
        "auto",
        description="engine v2: replay recorded CUDA graphs for every step that fits one "
        "(decode and prefill chunks; auto: on a CUDA device where a test graph replays; "
        "never on the CPU)",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info")
    log_format: Literal["text", "json"] = Field(
        "text", description="log lines as text or one JSON object each (with the request id)"
    )
    otel_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP traces endpoint (e.g. http://collector:4318/v1/traces); unset: "
        "no tracing. Needs the [otel] extra",
    )

    @field_validator(
        "adapters", "api_keys", "admin_keys", "metrics_keys", "lora_dirs", mode="before"
    )
    @classmethod
    def _lists_from_csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _DEVICE_RE.fullmatch(value):
            raise ValueError(f"device must be {DEVICE_FORMS}, not {value!r}")
        return value

    @field_validator("home")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("adapter_store")
    @classmethod
    def _check_store(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if value.startswith("s3://"):
            parse_s3_url(value)  # ValueError -> a validation error naming the field
            return value
        if "://" in value:
            raise ValueError(f"adapter_store must be a directory or s3://bucket/prefix: {value!r}")
        return str(Path(value).expanduser())

    @field_validator("adapters")
    @classmethod
    def _check_adapter_specs(cls, value: list[str]) -> list[str]:
        for spec in value:
            adapter_id, _ = parse_adapter_spec(spec)
            if not is_valid_adapter_id(adapter_id):
                raise ValueError(f"adapter id {adapter_id!r} (from {spec!r}) is not a valid id")
        return value

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError("default_max_new_tokens must not exceed max_new_tokens")
        from flora_server.auth import parse_keys

        # ValueError on a bad KEY:TENANT (or a tenant on a metrics key)
        keys = parse_keys(self.api_keys, self.admin_keys, self.metrics_keys)
        if len({k.key for k in keys}) != len(keys):
            raise ValueError("a key is listed twice (or is listed as two kinds of key)")
        if self.metrics_public and any(k.tenant is not None for k in keys):
            raise ValueError(
                "metrics_public cannot be on while a key is bound to a tenant: /metrics labels "
                "name every tenant's adapters (give Prometheus a metrics key instead)"
            )
        if self.probe_port is not None and self.probe_port != 0 and self.probe_port == self.port:
            raise ValueError("probe_port must differ from port")
        if self.max_staging_bytes < self.max_upload_bytes:
            raise ValueError("max_staging_bytes must be at least max_upload_bytes")
        return self

    @property
    def adapter_store_url(self) -> str | None:
        """`s3://bucket/prefix` when the store is in S3, else None."""
        store = self.adapter_store
        return store if store is not None and store.startswith("s3://") else None

    @property
    def adapter_store_dir(self) -> Path:
        """The adapter store directory, defaulting to `$FLORA_HOME/adapters`. With an S3
        store: the local scratch directory for staged uploads and downloads."""
        if self.adapter_store_url is not None:
            return self.home / "s3-scratch"
        if self.adapter_store is not None:
            return Path(self.adapter_store)
        return self.home / "adapters"

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys or self.admin_keys)


def parse_adapter_spec(spec: str) -> tuple[str, Path]:
    """`NAME=DIR` -> (NAME, DIR); `DIR` -> (directory name, DIR)."""
    name, sep, path = spec.partition("=")
    if sep and name and not name.startswith(("/", ".", "~")):
        return name, Path(path).expanduser()
    directory = Path(spec).expanduser()
    return directory.resolve().name, directory
