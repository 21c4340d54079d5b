"""Pick the adapter store from the settings: a directory or `s3://bucket/prefix`."""

from __future__ import annotations

from flora_server.adapters.store import AdapterStore, LocalAdapterStore
from flora_server.adapters.store_io import StoreExecutor
from flora_server.settings import Settings


def open_store(settings: Settings) -> AdapterStore:
    """`LocalAdapterStore` on `settings.adapter_store_dir`, or `S3AdapterStore` when
    `adapter_store` is an `s3://` url (endpoint from `s3_endpoint_url`, timeouts and
    attempts from `s3_*`, credentials and region from the standard AWS environment).
    Either runs request-driven calls on a `StoreExecutor` of `store_workers` threads and
    `store_timeout` seconds. Builds a client; makes no request."""
    executor = StoreExecutor(settings.store_workers, settings.store_timeout)
    url = settings.adapter_store_url
    if url is None:
        return LocalAdapterStore(settings.adapter_store_dir, executor=executor)
    from flora_server.adapters.s3_store import S3AdapterStore, make_s3_client

    client = make_s3_client(
        settings.s3_endpoint_url,
        connect_timeout=settings.s3_connect_timeout,
        read_timeout=settings.s3_read_timeout,
        max_attempts=settings.s3_max_attempts,
    )
    return S3AdapterStore.from_url(
        url, scratch_dir=settings.adapter_store_dir, client=client, executor=executor
    )
