"""The vocabulary of names the server accepts: adapter ids and `s3://` store urls.

A leaf module (no imports from the rest of the server): settings, both stores, the routes
and the schemas all check ids here, so the rule has one home.

An adapter id is `name` or `org/name`: each part starts with a letter or digit, continues
with letters, digits, `.`, `_` or `-` (at most 128 characters a part), and the id holds no
`..`. So no part is empty, `.` or `..`, and an id never starts with `/` or `.`: a store may
use it as a relative path (the slash becomes one directory level) without escaping its root.
"""

from __future__ import annotations

import re

_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
ADAPTER_ID_PATTERN = rf"^{_PART}(?:/{_PART})?$"
"""The id pattern (JSON Schema / OpenAPI `pattern`); `is_valid_adapter_id` adds: no `..`."""
ADAPTER_ID_RULE = (
    "must be NAME or ORG/NAME, each part matching ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$, with no '..'"
)
"""What `is_valid_adapter_id` accepts, for error messages."""
_ADAPTER_ID_RE = re.compile(ADAPTER_ID_PATTERN)
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def is_valid_adapter_id(adapter_id: object) -> bool:
    """True when `adapter_id` is a str matching `ADAPTER_ID_PATTERN` with no `..`."""
    return (
        isinstance(adapter_id, str)
        and _ADAPTER_ID_RE.fullmatch(adapter_id) is not None
        and ".." not in adapter_id
    )


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix/"); the prefix is "" or ends in /.

    Bucket names follow the S3 rules (3-63 chars of a-z, 0-9, '.', '-')."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// url: {url!r}")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not _BUCKET_RE.fullmatch(bucket):
        raise ValueError(f"bad S3 bucket name {bucket!r} in {url!r}")
    prefix = prefix.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise ValueError(f"bad S3 prefix {prefix!r} in {url!r}")
    return bucket, f"{prefix}/" if prefix else ""
