"""Acceptance: `pip install ./clients/python` into a fresh venv gives a working `flora`
command and `flora_client` package, and never pulls torch.

Installs with dependencies through pip's configured index (about 30 s here); marked slow.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from flora_stub_server import free_port

CLIENT_SRC = Path(__file__).resolve().parents[3] / "clients" / "python"


def run(*args: str | Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fresh_venv_install_without_torch(tmp_path: Path) -> None:
    # Build from a copy: pip writes build metadata next to the sources.
    src = tmp_path / "src"
    shutil.copytree(
        CLIENT_SRC, src, ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__")
    )
    venv = tmp_path / "venv"
    made = run(sys.executable, "-m", "venv", venv)
    assert made.returncode == 0, made.stderr
    python, flora = venv / "bin" / "python", venv / "bin" / "flora"

    installed = run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", src)
    assert installed.returncode == 0, installed.stderr[-3000:]

    no_torch = run(python, "-c", "import torch")
    assert no_torch.returncode == 1
    assert "No module named 'torch'" in no_torch.stderr

    where = run(python, "-c", "import flora_client; print(flora_client.__file__)")
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(venv)

    helped = run(flora, "--help")
    assert helped.returncode == 0, helped.stderr
    for command in ("adapters", "generate", "chat", "classify", "embed", "health"):
        assert command in helped.stdout

    url = f"http://127.0.0.1:{free_port()}"
    down = run(flora, "--url", url, "health")
    assert down.returncode == 1
    assert down.stderr.startswith(f"error: cannot reach {url}")
    assert "Traceback" not in down.stderr
