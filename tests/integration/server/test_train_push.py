"""`flora-train --push URL --adapter-id ID` uploads through the SDK to a real flora-serve
(efficientnet-lite0 on 127.0.0.1): the adapter is stored under its id, and a clash is one
line on stderr with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from serve_process import T, running_server

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

BASE = "efficientnet-lite0"


def _flora_train(out, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable, "-m", "flora.train", "image-classification", "--base", BASE,
        "--data", "builtin:mnist5k", "--max-steps", "2", "--batch-size", "8",
        "--image-size", "32", "--eval-limit", "8", "--threads", "1", "--quiet",
        "--out", str(out), *extra,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)


def test_push_uploads_the_trained_adapter(tmp_path):
    args = ["--model", BASE, "--adapter-store", str(tmp_path / "store")]
    with running_server(args) as url:
        proc = _flora_train(tmp_path / "a", "--push", url, "--adapter-id", "digits")
        assert proc.returncode == 0, proc.stderr
        assert f"pushed to {url} as digits (created)" in proc.stdout
        info = httpx.get(f"{url}/v1/adapters/digits", timeout=T)
        assert info.status_code == 200, info.text
        assert info.json().get("id", info.json().get("adapter_id")) == "digits"
        # the same id again with other bytes: the server's 409, one line, exit 2
        proc = _flora_train(tmp_path / "b", "--push", url, "--adapter-id", "digits", "--seed", "1")
        assert proc.returncode == 2
        assert proc.stderr.startswith("flora-train: error: --push"), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
