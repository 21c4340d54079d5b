"""Streams of server-sent events that can be closed early.

``with client.generate_stream("Hi") as stream: for event in stream: ...`` closes the HTTP
response when the block ends, so the server cancels the generation at once; so does
``stream.close()``. The async form is ``async with await client.generate_stream("Hi")``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Generator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Stream(Generic[T]):
    """An iterator of parsed events over an open response."""

    def __init__(self, events: Generator[dict[str, Any], None, None], parse: Callable[..., T]):
        self._events = events
        self._parse = parse

    def __iter__(self) -> Stream[T]:
        return self

    def __next__(self) -> T:
        return self._parse(next(self._events))

    def close(self) -> None:
        """Stop reading and close the connection (the server cancels the request)."""
        self._events.close()

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStream(Generic[T]):
    """The asyncio `Stream`: ``async for``, ``await stream.aclose()``, ``async with``."""

    def __init__(self, events: AsyncGenerator[dict[str, Any], None], parse: Callable[..., T]):
        self._events = events
        self._parse = parse

    def __aiter__(self) -> AsyncStream[T]:
        return self

    async def __anext__(self) -> T:
        return self._parse(await anext(self._events))

    async def aclose(self) -> None:
        """Stop reading and close the connection (the server cancels the request)."""
        await self._events.aclose()

    close = aclose

    async def __aenter__(self) -> AsyncStream[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
