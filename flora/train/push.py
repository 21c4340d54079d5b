"""``--push URL --adapter-id ID``: upload the finished adapter through the flora_client SDK."""

from __future__ import annotations

from pathlib import Path

from flora.train.errors import TrainError


def push_adapter(adapter_dir: Path, url: str, adapter_id: str, api_key: str | None = None) -> str:
    """Upload ``adapter_dir`` (adapter_config.json + adapter.safetensors) to the
    flora-serve at ``url`` as ``adapter_id``; returns the server's status (``created``,
    ``unchanged`` or ``replaced``). TrainError with the server's reason on failure."""
    try:
        from flora_client import Client, FloraError
    except ImportError:
        raise TrainError(
            "--push needs the flora-client SDK (pip install ./clients/python)"
        ) from None
    try:
        with Client(url, api_key=api_key, max_retries=0) as client:
            result = client.adapters.upload(adapter_dir, adapter_id)
    except FloraError as exc:
        raise TrainError(f"--push {url}: {exc}") from None
    return str(result.status)
