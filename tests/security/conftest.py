"""Shared pieces of the security tests: the fake-engine app from tests/unit/server and a
tiny real model served by a real `flora-serve` process (see `tiny_server.py`)."""

from __future__ import annotations

import sys
from pathlib import Path

# api_fakes (the fake engine and adapter bytes) lives beside the server unit tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "server"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
