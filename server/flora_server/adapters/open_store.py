"""Pick the adapter store from the settings: a directory or `s3://bucket/prefix`."""

from __future__ import annotations

from flora_server.adapters.store import AdapterStore, LocalAdapterStore
from flora_server.settings import Settings


def open_store(settings: Settings) -> AdapterStore:
    """`LocalAdapterStore` on `settings.adapter_store_dir`, or `S3AdapterStore` when
    `adapter_store` is an `s3://` url (endpoint from `s3_endpoint_url`, credentials and
    region from the standard AWS environment). Builds a client; makes no request."""
    url = settings.adapter_store_url
    if url is None:
        return LocalAdapterStore(settings.adapter_store_dir)
    from flora_server.adapters.s3_store import S3AdapterStore

    return S3AdapterStore.from_url(
        url, scratch_dir=settings.adapter_store_dir, endpoint_url=settings.s3_endpoint_url
    )
