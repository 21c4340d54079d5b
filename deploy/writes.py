"""Where the server writes, and whether the pod lets it: every directory it writes under its
configuration must be on a writable volume (the root filesystem is read-only and the
image's FLORA_HOME root-owned), the S3 scratch volume must hold the staging peak, and the
emptyDir volumes must fit in the pod's ephemeral-storage limit.

Pure functions over one pod spec and the server's environment (deploy.invariants resolves
that environment from the rendered objects and the image); each returns its problems.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from typing import Any

Manifest = dict[str, Any]

# Volume sources a container can write through (configMap, secret, downwardAPI and
# projected volumes are always read-only).
WRITABLE_VOLUMES = frozenset({"emptyDir", "persistentVolumeClaim", "ephemeral", "nfs"})
# Threads of the engine's adapter loader pool (server/flora_server/engine/adapter_cache.py):
# each may hold one downloaded adapter in the S3 scratch directory at once.
LOADER_THREADS = 2

_QUANTITY = re.compile(r"^([0-9.]+)([KMGTPE]i?|k|m)?$")
_UNITS: dict[str | None, float] = {
    None: 1,
    "m": 1e-3,
    "k": 1e3,
    **{u: 1000.0 ** (i + 2) for i, u in enumerate("MGTPE")},
    **{f"{u}i": 1024.0 ** (i + 1) for i, u in enumerate("KMGTPE")},
}


def quantity_bytes(value: str | int) -> float:
    """A Kubernetes quantity (`4Gi`, `512Mi`, `1G`, `1024`) in bytes."""
    match = _QUANTITY.match(str(value))
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _under(path: str, directory: str) -> bool:
    path, directory = posixpath.normpath(path), posixpath.normpath(directory)
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def written_paths(
    env: Mapping[str, str], prepared_models: frozenset[str] | None = None
) -> dict[str, str]:
    """{directory: what the server writes there} for the server's environment `env`
    (server/flora_server/settings.py and adapters/):

    - the adapter store directory, with its upload staging (`.uploads`), for a local store
      (default `$FLORA_HOME/adapters`); for an `s3://` store its scratch directory
      `$FLORA_HOME/s3-scratch` (staged uploads, `.put-` and `.get-` copies), created at
      start-up;
    - `$FLORA_HOME/models` when FLORA_MODEL names a zoo model the image did not prepare
      (converted there at start-up), `$FLORA_HOME/fingerprints` when it is a directory
      (its fingerprint is cached there); nothing when the image prepared it;
    - the temporary directory and the caches (Hugging Face, XDG, numba, triton, matplotlib).
    """
    home = env.get("FLORA_HOME") or posixpath.join(env.get("HOME", "/root"), ".cache", "flora")
    store = env.get("FLORA_ADAPTER_STORE", "").strip()
    paths: dict[str, str] = {}
    if store.startswith("s3://"):
        paths[posixpath.join(home, "s3-scratch")] = "the S3 store's scratch and upload staging"
    else:
        paths[store or posixpath.join(home, "adapters")] = "the adapter store and upload staging"
    model = env.get("FLORA_MODEL", "smollm2-135m-instruct")
    if "/" in model:
        paths[posixpath.join(home, "fingerprints")] = f"the fingerprint cache of {model}"
    elif prepared_models is not None and model not in prepared_models:
        paths[posixpath.join(home, "models")] = f"the conversion of {model} (not in the image)"
    paths[env.get("TMPDIR") or "/tmp"] = "temporary files"
    for var in ("HF_HOME", "XDG_CACHE_HOME", "NUMBA_CACHE_DIR", "TRITON_CACHE_DIR", "MPLCONFIGDIR"):
        if env.get(var):
            paths[env[var]] = var
    return paths


def _mount_of(container: Manifest, path: str) -> Manifest | None:
    """The volumeMount that holds `path` (the deepest one above it), or None: the root fs."""
    mounts = [m for m in container.get("volumeMounts", []) if _under(path, m["mountPath"])]
    return max(mounts, key=lambda m: len(posixpath.normpath(m["mountPath"])), default=None)


def staging_peak_bytes(env: Mapping[str, str]) -> int:
    """Most bytes the S3 store's scratch directory holds at once: the uploads being received
    (FLORA_MAX_STAGING_BYTES), a second copy of each as the store spools it for the PUT, and
    one downloaded adapter (up to FLORA_MAX_UPLOAD_BYTES) per loader thread."""
    staging = int(env.get("FLORA_MAX_STAGING_BYTES", 1024**3))
    upload = int(env.get("FLORA_MAX_UPLOAD_BYTES", 256 * 1024**2))
    return 2 * staging + LOADER_THREADS * upload


def write_path_problems(
    pod: Manifest,
    container: Manifest,
    env: Mapping[str, str],
    prepared_models: frozenset[str] | None = None,
) -> list[str]:
    """Every directory the server writes is on a writable volume (the root filesystem is
    read-only, and the image's FLORA_HOME is root-owned), the S3 scratch volume holds the
    staging peak, and the emptyDir volumes fit in the pod's ephemeral-storage limit (else
    the kubelet evicts the pod before any volume reaches its own sizeLimit)."""
    problems = []
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for path, what in written_paths(env, prepared_models).items():
        mount = _mount_of(container, path)
        volume = volumes.get(mount["name"], {}) if mount else {}
        if mount is None or mount.get("readOnly") or not WRITABLE_VOLUMES & set(volume):
            where = f"volume {mount['name']!r}" if mount else "the read-only root filesystem"
            problems.append(f"{path} ({what}) is on {where}, not a writable volume mount")
        elif path.endswith("/s3-scratch") and "emptyDir" in volume:
            limit = volume["emptyDir"].get("sizeLimit")
            if limit is None or quantity_bytes(limit) < staging_peak_bytes(env):
                problems.append(
                    f"emptyDir {mount['name']!r} ({what}) has sizeLimit {limit}, under the "
                    f"staging peak of {staging_peak_bytes(env)} bytes (2 x "
                    f"FLORA_MAX_STAGING_BYTES + {LOADER_THREADS} x FLORA_MAX_UPLOAD_BYTES)"
                )
    on_disk = [
        v["emptyDir"].get("sizeLimit")
        for v in volumes.values()
        if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory"
    ]
    limits = [
        c.get("resources", {}).get("limits", {}).get("ephemeral-storage") for c in pod["containers"]
    ]
    if limits and all(limits):
        total = sum(quantity_bytes(q) for q in limits)
        if None in on_disk or sum(quantity_bytes(q) for q in on_disk) > total:
            problems.append(
                f"the emptyDir sizeLimits ({' + '.join(str(q or 'none') for q in on_disk)}) "
                f"exceed the ephemeral-storage limit ({' + '.join(limits)}): the kubelet "
                "would evict the pod first"
            )
    return problems
