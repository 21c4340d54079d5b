"""Settings for the whole test process."""

from __future__ import annotations

import os

# Apps started in this process must not freeze its heap (`--gc-freeze`): each test's engine
# and model, frozen by the next app's start-up, would never be collected after its test.
os.environ.setdefault("FLORA_GC_FREEZE", "0")
