"""API keys, roles and tenants.

`FLORA_API_KEYS` (inference) and `FLORA_ADMIN_KEYS` (adapter management, also inference) are
comma-separated lists; an entry `KEY:TENANT` binds the key to a tenant. `FLORA_METRICS_KEYS`
may read `/metrics` and nothing else (a scraper's token; never bound to a tenant). A tenant owns the
adapters whose id starts with `TENANT.` (ids cannot contain `/`, so the namespace is a
prefix): a tenant-bound key sees and uses only those, and every other adapter answers 404 as
if it did not exist. A key without a tenant sees every adapter.

The authenticated caller of the current request (`Principal`) lives in a `ContextVar` set by
the (async) auth dependency, so the adapter checks deep in a handler (`visible`) need no extra
argument threaded through every route. Each request runs in its own task context, so the
value never leaks between requests.
"""

from __future__ import annotations

import contextvars
import functools
import hmac
import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

TENANT_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_TENANT_RE = re.compile(TENANT_PATTERN)
# A key is compared with the Authorization header, which the server reads as latin-1 and the
# comparison encodes as UTF-8: only printable ASCII (no whitespace) survives both unchanged.
# Printable ASCII; spaces inside a key survive the header (`Bearer a b` carries "a b"), at
# its ends they would be stripped.
_KEY_RE = re.compile(r"^[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?$")

Role = Literal["inference", "admin", "metrics"]


@dataclass(frozen=True)
class ApiKey:
    key: str
    role: Role
    tenant: str | None = None


@dataclass(frozen=True)
class Principal:
    """Who is calling: their role and tenant (None: sees every adapter)."""

    role: Role
    tenant: str | None = None


# The open server (no keys configured) and the default outside a request: sees everything.
OPEN = Principal("admin", None)
_current: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "flora_principal", default=OPEN
)


def parse_key(entry: str, role: Role) -> ApiKey:
    """`KEY` or `KEY:TENANT` -> ApiKey. Raises ValueError on an empty key, a key that is not
    printable ASCII (spaces only inside it), or a bad tenant. The key is never in the
    message."""
    key, sep, tenant = entry.rpartition(":")
    if not sep:
        key, tenant = entry, ""
    if not key:
        raise ValueError(f"empty key in {role} key entry")
    if not _KEY_RE.fullmatch(key):
        raise ValueError(
            f"{role} keys must be printable ASCII, spaces only inside them (what an "
            "Authorization: Bearer header carries intact)"
        )
    if sep and not _TENANT_RE.fullmatch(tenant):
        raise ValueError(f"tenant of a {role} key must match {TENANT_PATTERN}")
    if sep and role == "metrics":
        raise ValueError("a metrics key cannot be bound to a tenant (it reads every label)")
    return ApiKey(key, role, tenant or None)


@functools.lru_cache(maxsize=8)
def configured_keys(
    api_keys: tuple[str, ...], admin_keys: tuple[str, ...], metrics_keys: tuple[str, ...]
) -> list[ApiKey]:
    """`parse_keys`, once per configuration: what each request's key is identified
    against (the settings never change while serving)."""
    return parse_keys(list(api_keys), list(admin_keys), metrics_keys)


def parse_keys(
    api_keys: list[str], admin_keys: list[str], metrics_keys: list[str] | tuple[str, ...] = ()
) -> list[ApiKey]:
    """Every configured key with its role and tenant (admin entries first)."""
    keys = [parse_key(e, "admin") for e in admin_keys]
    keys += [parse_key(e, "inference") for e in api_keys]
    keys += [parse_key(e, "metrics") for e in metrics_keys]
    return keys


# What a metrics key presented anywhere but /metrics is told (a 403).
METRICS_KEY_ONLY = "a metrics key may only read /metrics"


def may_read_metrics(key: ApiKey) -> bool:
    """`/metrics` labels name every tenant's adapters: only a metrics key or an admin key
    bound to no tenant may read them."""
    return key.role == "metrics" or (key.role == "admin" and key.tenant is None)


def identify(presented: str, keys: list[ApiKey]) -> ApiKey | None:
    """The configured key equal to `presented`, compared in constant time against every key
    (timing reveals neither a prefix nor which list matched)."""
    found: ApiKey | None = None
    for candidate in keys:
        if hmac.compare_digest(presented.encode(), candidate.key.encode()) and found is None:
            found = candidate
    return found


def set_principal(principal: Principal) -> None:
    _current.set(principal)


def current_principal() -> Principal:
    return _current.get()


def owns(principal: Principal, adapter_id: str) -> bool:
    """Whether `principal` may see and use `adapter_id` (its tenant's `TENANT.` prefix)."""
    return principal.tenant is None or adapter_id.startswith(principal.tenant + ".")


def visible(adapter_id: str) -> bool:
    """`owns` for the caller of the current request."""
    return owns(current_principal(), adapter_id)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def startup_warnings(api_keys: list[str], admin_keys: list[str], host: str) -> list[str]:
    """What `flora-serve` logs at start about its exposure."""
    if api_keys or admin_keys:
        return []
    if is_loopback(host):
        return [
            "no API keys configured (FLORA_API_KEYS / FLORA_ADMIN_KEYS): every route is open; "
            f"bound to {host} only"
        ]
    return [
        f"no API keys configured and bound to {host}: anyone who can reach this address "
        "can run inference and upload or delete adapters"
    ]
