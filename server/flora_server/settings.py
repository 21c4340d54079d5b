"""Server settings: environment variables with the prefix `FLORA_`, each also a CLI flag.

`Settings()` reads the environment; `flora_server.cli` overlays the flags given on the command
line. Nothing here is instantiated at import time: `create_app(settings)` receives an instance.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

# The id rule lives in flora_server.ids; re-exported for the modules that import it here.
from flora_server.adapters import store_io
from flora_server.auth import Role, parse_key, parse_keys
from flora_server.ids import ADAPTER_ID_PATTERN as ADAPTER_ID_PATTERN
from flora_server.ids import is_valid_adapter_id as is_valid_adapter_id
from flora_server.ids import parse_s3_url

_DEVICE_RE = re.compile(r"^(cpu|cuda|cuda:\d+|mps)$")
DEVICE_FORMS = "cpu, cuda, cuda:N or mps"  # what _DEVICE_RE accepts, for messages and help


ENV_PREFIX = "FLORA_"

# Flags whose name differs from the field (the field is a list, the flag is singular).
FLAG_NAMES = {
    "adapters": "adapter",
    "api_keys": "api-key",
    "admin_keys": "admin-key",
    "metrics_keys": "metrics-key",
}

_KEY_ROLES: dict[str, Role] = {
    "api_keys": "inference",
    "admin_keys": "admin",
    "metrics_keys": "metrics",
}


def _split_csv(value: object, *, drop_empty: bool = False) -> object:
    # Env vars hold lists as "a,b,c" (or JSON, which pydantic then parses). With `drop_empty`,
    # flag entries are stripped and empty ones dropped too, as in the env form.
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"a value starting with [ must be a JSON list: {exc}") from None
        return [part.strip() for part in text.split(",") if part.strip()]
    if drop_empty and isinstance(value, list):
        return [v.strip() for v in value if not isinstance(v, str) or v.strip()]
    return value


def _check_dir_usable(path: Path) -> None:
    """ValueError when `path` cannot be a directory: it is something else, or a parent is.
    What cannot be looked at (no permission) is left to the start, which names it."""
    for candidate in (path, *path.parents):
        try:
            exists, is_dir = candidate.exists(), candidate.is_dir()
        except OSError:
            return
        if exists:
            if not is_dir:
                what = (
                    "is not a directory" if candidate == path else f"is inside a file, {candidate}"
                )
                raise ValueError(f"{str(path)!r} {what}")
            return


class Settings(BaseSettings):
    """Everything `flora-serve` can be told. Env `FLORA_<NAME>`, flag `--<name-with-dashes>`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", validate_default=True, populate_by_name=True
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            _EnvWithoutServiceLinks(settings_cls),
            dotenv_settings,
            file_secret_settings,
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

    @field_validator("api_keys", "admin_keys", "metrics_keys", mode="before")
    @classmethod
    def _keys_from_csv(cls, value: object) -> object:
        # An empty key flag stays, and is refused: `--api-key "$KEY"` with KEY unset must not
        # start an open server.
        return _split_csv(value)

    @field_validator("adapters", "lora_dirs", mode="before")
    @classmethod
    def _lists_from_csv(cls, value: object) -> object:
        return _split_csv(value, drop_empty=True)

    @field_validator("api_keys", "admin_keys", "metrics_keys")
    @classmethod
    def _check_keys(cls, value: list[str], info: ValidationInfo) -> list[str]:
        for entry in value:
            parse_key(entry, _KEY_ROLES[str(info.field_name)])  # ValueError names what is wrong
        return value

    @field_validator("lora_dirs")
    @classmethod
    def _check_lora_dirs(cls, value: list[str]) -> list[str]:
        # A relative entry would follow the working directory (and "" would be it).
        dirs = [str(Path(entry).expanduser()) for entry in value]
        for entry in dirs:
            if not Path(entry).is_absolute():
                raise ValueError(f"{entry!r} is not an absolute path")
        return dirs

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        if not value.strip():
            raise ValueError(
                "must not be empty (an empty host listens on every interface; "
                "say 0.0.0.0 or :: for that)"
            )
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _DEVICE_RE.fullmatch(value):
            raise ValueError(f"device must be {DEVICE_FORMS}, not {value!r}")
        return value

    @field_validator("home")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        home = value.expanduser()
        _check_dir_usable(home)  # the default store and the S3 scratch directory live here
        return home

    @field_validator("adapter_store")
    @classmethod
    def _check_store(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if value.startswith("s3://"):
            parse_s3_url(value)  # ValueError -> a validation error naming the field
            return value
        if "://" in value:
            raise ValueError(f"must be a directory or s3://bucket/prefix: {value!r}")
        directory = Path(value).expanduser()
        _check_dir_usable(directory)
        return str(directory)

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
            raise _joint_error(
                "default_max_new_tokens must not exceed max_new_tokens",
                "default_max_new_tokens",
                "max_new_tokens",
            )
        keys = parse_keys(self.api_keys, self.admin_keys, self.metrics_keys)
        if len({k.key for k in keys}) != len(keys):
            raise _joint_error("a key is listed twice, or as two kinds of key", *_KEY_ROLES)
        if self.metrics_public and any(k.tenant is not None for k in keys):
            raise _joint_error(
                "metrics_public cannot be on while a key is bound to a tenant: /metrics labels "
                "name every tenant's adapters (give Prometheus a metrics key instead)",
                "metrics_public",
            )
        if self.probe_port is not None and self.probe_port != 0 and self.probe_port == self.port:
            raise _joint_error("probe_port must differ from port", "probe_port", "port")
        if self.max_staging_bytes < self.max_upload_bytes:
            raise _joint_error(
                "max_staging_bytes must be at least max_upload_bytes",
                "max_staging_bytes",
                "max_upload_bytes",
            )
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


def env_names(name: str) -> tuple[str, ...]:
    """The environment variables that set field `name` (its validation aliases, else
    FLORA_<NAME>), upper-cased."""
    alias = Settings.model_fields[name].validation_alias
    if isinstance(alias, AliasChoices):
        return tuple(str(choice).upper() for choice in alias.choices)
    if isinstance(alias, str):
        return (alias.upper(),)
    return (ENV_PREFIX + name.upper(),)


def flag_name(name: str) -> str:
    """The `flora-serve` flag of field `name`."""
    return "--" + FLAG_NAMES.get(name, name.replace("_", "-"))


def _field_of(name: str) -> str | None:
    """The field that `name` (a field name or one of its env aliases) sets."""
    if name in Settings.model_fields:
        return name
    upper = name.upper()
    return next((f for f in Settings.model_fields if upper in env_names(f)), None)


def _joint_error(message: str, *names: str) -> ValueError:
    """A rule joining settings has no single field to report under (its error has no
    `loc`): the message names each setting's flag and env variables itself."""
    return ValueError(f"{message} ({'; '.join(setting_label(n) for n in names)})")


def setting_label(name: str) -> str:
    """How a message names a setting: its flag and its env variables, e.g.
    `--api-key / FLORA_API_KEYS`. `name` is a field name or one of its env aliases (a
    validation error's `loc`); an unknown name is returned as is."""
    field_name = _field_of(name)
    if field_name is None:
        return name
    return f"{flag_name(field_name)} / {' or '.join(env_names(field_name))}"


# Kubernetes service links (a Service named e.g. `flora` or `flora-serve` in the pod's
# namespace) inject FLORA_<SERVICE>_SERVICE_HOST, _SERVICE_PORT[_<NAME>], _PORT and
# _PORT_<N>_<PROTO>[_PROTO|_PORT|_ADDR]. They are not settings and never stop the server.
_SERVICE_LINK_NAME = re.compile(
    r"^FLORA_(?:[A-Z0-9_]+_)?(?:SERVICE_HOST|SERVICE_PORT(?:_[A-Z0-9_]+)?"
    r"|PORT_\d+_(?:TCP|UDP|SCTP)(?:_(?:PROTO|PORT|ADDR))?)$"
)
# The bare `<SERVICE>_PORT` form, told from a port setting by its value.
_SERVICE_LINK_VALUE = re.compile(r"^(?:tcp|udp|sctp)://\S+:\d+$")


def is_service_link(name: str, value: str) -> bool:
    """Whether the variable `name`=`value` is one Kubernetes injects for a Service."""
    upper = name.upper()
    if _SERVICE_LINK_NAME.fullmatch(upper):
        return True
    return upper.endswith("_PORT") and bool(_SERVICE_LINK_VALUE.fullmatch(value.strip()))


class _EnvWithoutServiceLinks(EnvSettingsSource):
    """The FLORA_ environment, less port settings whose value is a service link
    (`FLORA_PORT=tcp://10.0.0.7:8000` from a Service named `flora`): the setting keeps its
    flag or its default instead of failing to parse."""

    def __call__(self) -> dict[str, Any]:
        values = super().__call__()
        for key, value in list(values.items()):
            field_name = _field_of(key)
            if field_name is None or not isinstance(value, str):
                continue
            if is_service_link(env_names(field_name)[0], value):
                del values[key]
        return values


def parse_adapter_spec(spec: str) -> tuple[str, Path]:
    """`NAME=DIR` -> (NAME, DIR); `DIR` -> (directory name, DIR)."""
    name, sep, path = spec.partition("=")
    if sep and name and not name.startswith(("/", ".", "~")):
        return name, Path(path).expanduser()
    directory = Path(spec).expanduser()
    return directory.resolve().name, directory
