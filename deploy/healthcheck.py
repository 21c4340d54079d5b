"""Container health probe for Docker's HEALTHCHECK: exit 0 when `/ready` answers 200.

Healthy means ready, as the Deployment's readinessProbe means it: the model is loaded and
warmed and the server is not draining. `/health` (alive) would call a replica whose start-up
failed healthy (it answers /health 200 and /ready 503 forever), and Compose's
`depends_on: condition: service_healthy` would route to it. The Dockerfile's start period
covers the model load. Kubernetes does not use this (the Deployment has its own probes).
Standard library only, so it runs in the image without curl. The port is `FLORA_PROBE_PORT`
when set (the probe listener answers while the main port is saturated), else `FLORA_PORT`,
as the server's.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping

# The readinessProbe's path; deploy.check asserts the two agree.
PROBE_PATH = "/ready"


def probe(url: str, timeout: float = 4.0) -> bool:
    """True when `url` answers HTTP 200 within `timeout` seconds."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def probe_url(environ: Mapping[str, str]) -> str:
    """The readiness URL of the server in this container."""
    port = environ.get("FLORA_PROBE_PORT") or environ.get("FLORA_PORT", "8000")
    return f"http://127.0.0.1:{port}{PROBE_PATH}"


def main() -> int:
    """Probe the local server once; the exit status is Docker's health verdict."""
    return 0 if probe(probe_url(os.environ)) else 1


if __name__ == "__main__":
    sys.exit(main())
