"""Python SDK for flora-serve: `Client`, `AsyncClient`, typed errors and response types.

    from flora_client import Client
    with Client() as client:                    # $FLORA_URL, $FLORA_API_KEY
        client.adapters.upload("runs/my-adapter", "my-adapter")
        print(client.generate("Hello", adapter_id="my-adapter").generated_text)

HTTP only: this package never imports torch.
"""

__version__ = "0.1.0"

from flora_client.async_client import AsyncAdapters, AsyncClient
from flora_client.client import Adapters, Client
from flora_client.errors import (
    APIError,
    BadRequest,
    Conflict,
    FloraConnectionError,
    FloraError,
    FloraTimeoutError,
    Forbidden,
    NotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    ServerError,
    StreamError,
    Unauthorized,
    ValidationError,
)
from flora_client.retry import RetryKind, RetryPolicy

__all__ = [
    "APIError",
    "Adapters",
    "AsyncAdapters",
    "AsyncClient",
    "BadRequest",
    "Client",
    "Conflict",
    "FloraConnectionError",
    "FloraError",
    "FloraTimeoutError",
    "Forbidden",
    "NotFound",
    "NotReady",
    "Overloaded",
    "PayloadTooLarge",
    "RetryKind",
    "RetryPolicy",
    "ServerError",
    "StreamError",
    "Unauthorized",
    "ValidationError",
    "__version__",
]
