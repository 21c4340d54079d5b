"""A fake `GenerationEngine` for API tests: deterministic, no torch.

Tokens are the prompt's UTF-8 bytes. Generation echoes the prompt byte by byte; with an
adapter every byte is shifted by `len(adapter_id)` (so two adapters give different text).
Token i has logprob -(i + 1) / 10; with `top_logprobs` its alternatives are itself and the
next byte (logprob - 1). With `prompt_logprobs`, prompt token j > 0 has logprob -j / 100.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from flora.adapter import read_embedded_config
from flora_server.adapters.registry import (
    AdapterRegistry,
    AdapterValidationError,
    library_errors,
)
from flora_server.engine.protocol import (
    AdapterNotFoundError,
    EngineStats,
    FinishEvent,
    GenerationEvent,
    GenerationRequest,
    Logprob,
    QueueFullError,
    TokenEvent,
)
from flora_server.main import create_app
from flora_server.metrics import ServerMetrics
from flora_server.settings import Settings

FAKE_FINGERPRINT = "sha256:fake-base"


def expected_text(prompt: str, adapter_id: str | None, n: int) -> str:
    """What the fake generates (independent of its implementation, for assertions)."""
    shift = len(adapter_id) if adapter_id else 0
    data = prompt.encode()
    return "".join(chr((data[i % len(data)] + shift) % 128) for i in range(n))


class FakeEngine:
    kind = "causal-lm"

    def __init__(self, source: AdapterRegistry, context_length: int = 64) -> None:
        self.model_name = "fake-base"
        self.context_length = context_length
        self.kv_capacity_tokens = 0  # no KV pool unless a test sets one
        self.max_slots = 4
        self.source = source
        self.requests: list[GenerationRequest] = []
        self.invalidated: list[str] = []
        self.queue_full = False
        self.token_delay = 0.0
        self.started = False
        self.loaded: set[str] = set()
        self.running: list[str] = []

    @property
    def ready(self) -> bool:
        return self.started

    @property
    def healthy(self) -> bool:
        return True

    def start(self) -> None:
        self.started = True

    async def shutdown(self, timeout: float) -> None:
        self.started = False

    async def tokenize(self, text: str) -> list[int]:
        return list(text.encode())

    async def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.running),
            waiting=0,
            running_adapters=tuple(self.running),
            waiting_adapters=(),
            max_slots=self.max_slots,
            mode="idle",
            loaded_adapters=tuple(sorted(self.loaded)),
            kv_capacity_tokens=self.kv_capacity_tokens,
        )

    def invalidate_adapter(self, adapter_id: str) -> None:
        self.invalidated.append(adapter_id)
        self.loaded.discard(adapter_id)

    async def compile_constraint(self, spec):  # type: ignore[no-untyped-def]
        from flora_server.engine.constraints import ConstraintError

        raise ConstraintError("structured output is not supported by this engine")

    def fail_in_flight(self, reason: str) -> None:
        self.failed_with = reason

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        if self.queue_full:
            raise QueueFullError(2.5)
        self.requests.append(request)
        return self._run(request)

    async def _run(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        adapter, sha256 = request.adapter_id, None
        if adapter is not None:
            if not self.source.exists(adapter):
                raise AdapterNotFoundError(adapter)
            loaded = self.source.load(adapter)
            sha256 = getattr(loaded, "sha256", None)
            self.loaded.add(adapter)
            self.running.append(adapter)
        try:
            shift = len(adapter) if adapter else 0
            ids = request.prompt_ids
            text = ""
            reason = "length"
            n = 0
            for i in range(request.params.max_new_tokens):
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                tok = (ids[i % len(ids)] + shift) % 128
                piece = chr(tok)
                if any((text + piece).endswith(s) for s in request.params.stop):
                    reason = "stop"
                    break
                text += piece
                n += 1
                logprob = -(i + 1) / 10 if request.params.logprobs else None
                lp = -(i + 1) / 10
                top = (Logprob(tok, piece, lp), Logprob(tok + 1, chr(tok + 1), lp - 1))
                yield TokenEvent(
                    tok,
                    piece,
                    piece,
                    logprob,
                    top_logprobs=top[: request.params.top_logprobs],
                    adapter_sha256=sha256,
                )
            prompt = ()
            if request.params.prompt_logprobs:
                prompt = tuple(
                    Logprob(t, chr(t), -j / 100 if j else None) for j, t in enumerate(ids)
                )
            yield FinishEvent(
                reason, text, len(ids), n, prompt_logprobs=prompt, adapter_sha256=sha256
            )
        finally:
            if adapter is not None:
                self.running.remove(adapter)


def read_adapter_config(path: Path) -> dict[str, Any]:
    """The config embedded in an archive, format errors reported as a validator does."""
    with library_errors():
        return read_embedded_config(path)


def fake_validator(path: Path) -> object:
    config = read_adapter_config(path)
    if config.get("base_model", {}).get("fingerprint") != FAKE_FINGERPRINT:
        raise AdapterValidationError("fingerprint does not match the base")
    return config


def fake_factory(holder: dict[str, FakeEngine]):
    def factory(settings: Settings, registry: AdapterRegistry, metrics: ServerMetrics):
        engine = FakeEngine(registry)
        holder["engine"] = engine
        return engine, fake_validator

    return factory


def make_weights(values: bytes = b"\x00" * 16, metadata: dict[str, str] | None = None) -> bytes:
    """A minimal safetensors file with one F32 tensor of 4 elements."""
    header: dict[str, object] = {
        "flora.x.core": {
            "dtype": "F32",
            "shape": [len(values) // 4],
            "data_offsets": [0, len(values)],
        }
    }
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + values


def make_config(fingerprint: str = FAKE_FINGERPRINT, rank: int = 4) -> bytes:
    return json.dumps(
        {
            "format_version": 1,
            "method": "flora",
            "config": {"rank": rank},
            "base_model": {"id": "fake-base", "fingerprint": fingerprint},
        }
    ).encode()


def make_archive(values: bytes = b"\x00" * 16, fingerprint: str = FAKE_FINGERPRINT) -> bytes:
    return make_weights(values, {"adapter_config": make_config(fingerprint).decode()})


@contextlib.contextmanager
def running_app(tmp_path: Path, **overrides: object) -> Iterator[tuple[TestClient, FakeEngine]]:
    """A started app on the fake engine, waited until /ready."""
    settings = Settings(home=tmp_path / "home", **overrides)
    holder: dict[str, FakeEngine] = {}
    app = create_app(settings, engine_factory=fake_factory(holder))
    with TestClient(app) as client:
        for _ in range(200):
            if client.get("/ready").status_code == 200:
                break
            time.sleep(0.01)
        else:
            raise AssertionError(f"not ready: {client.get('/ready').json()}")
        yield client, holder["engine"]


def sse_events(text: str) -> list[object]:
    """Parse `data: ...` SSE events (JSON, or the literal [DONE])."""
    out: list[object] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def held_back_then_eos() -> list[GenerationEvent]:
    """What the engine emits for "ab", "\\n", "\\n" then EOS with stop ["\\n\\nX"]: the two
    newlines' text is held back (they could start the stop) and released with EOS; each
    event still carries its token's own text. Token i has logprob -(i + 1) / 10 and two
    alternatives, itself first."""
    tokens = [(97, "ab", "ab"), (10, "", "\n"), (10, "", "\n"), (0, "\n\n", "")]

    def top(i: int, token_id: int, own: str) -> tuple[Logprob, ...]:
        return (Logprob(token_id, own, -(i + 1) / 10), Logprob(98, "b", -(i + 1)))

    events: list[GenerationEvent] = [
        TokenEvent(t, text, own, -(i + 1) / 10, special=t == 0, top_logprobs=top(i, t, own))
        for i, (t, text, own) in enumerate(tokens)
    ]
    events.append(FinishEvent("eos", "ab\n\n", 2, len(tokens), token_ids=(97, 10, 10, 0)))
    return events


def scripted(events: list[GenerationEvent]):  # type: ignore[no-untyped-def]
    """A `generate` that yields `events` for any request (monkeypatch it onto the engine)."""

    async def generate(request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        for event in events:
            yield event

    return generate
