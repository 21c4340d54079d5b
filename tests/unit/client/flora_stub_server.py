"""A stub flora-serve for client tests: the real API's shapes, deterministic answers.

Generation "reverses the prompt's words": prompt "a b c" gives tokens [" c", " b", " a"],
and an adapter prepends a token "[<id>]". Tests can therefore assert exact text without a
model. Failures are injected per route through `StubState.fail_plan`, and every request is
counted in `StubState.attempts`.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

BASE = "stub-base"
LABELS = ["cat", "dog", "fish", "bird", "tree", "car"]
MAX_NEW_TOKENS = 100


@dataclass
class StubState:
    ready: bool = True
    api_key: str | None = None  # inference key; None: no auth
    admin_key: str | None = None
    max_upload_bytes: int = 1 << 20
    # "METHOD /path" -> list of (status, Retry-After or None) answered before the real route.
    fail_plan: dict[str, list[tuple[int, str | None]]] = field(default_factory=dict)
    attempts: Counter[str] = field(default_factory=Counter)
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_json: dict[str, Any] = field(default_factory=dict)
    last_form: dict[str, Any] = field(default_factory=dict)

    def reset(self) -> None:
        fresh = StubState()
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(fresh, name))


def error(status: int, kind: str, message: str, retry_after: str | None = None) -> JSONResponse:
    headers = {"Retry-After": retry_after} if retry_after is not None else None
    return JSONResponse(
        {"error": {"type": kind, "message": message}}, status_code=status, headers=headers
    )


def reply_tokens(prompt: str, adapter_id: str | None, limit: int) -> list[str]:
    tokens = [f" {word}" for word in reversed(prompt.split())]
    if adapter_id:
        tokens.insert(0, f"[{adapter_id}]")
    return tokens[:limit]


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def build_app(state: StubState) -> FastAPI:
    app = FastAPI()

    @app.middleware("http")
    async def plan_and_auth(request: Request, call_next: Any) -> Any:
        key = f"{request.method} {request.url.path}"
        state.attempts[key] += 1
        plan = state.fail_plan.get(key)
        if plan:
            status, retry_after = plan.pop(0)
            kind = {429: "rate_limit_error", 503: "service_unavailable"}.get(status, "server_error")
            return error(status, kind, f"injected {status}", retry_after)
        if state.api_key and request.url.path not in ("/health", "/ready"):
            given = request.headers.get("authorization", "").removeprefix("Bearer ")
            admin = request.url.path.startswith("/v1/adapters")
            if given not in (state.api_key, state.admin_key):
                return error(401, "authentication_error", "missing or unknown API key")
            if admin and given != state.admin_key:
                return error(403, "permission_error", "adapter management needs the admin key")
        return await call_next(request)

    def unknown(adapter_id: str | None) -> JSONResponse | None:
        if adapter_id is not None and adapter_id != BASE and adapter_id not in state.adapters:
            return error(404, "not_found_error", f"adapter '{adapter_id}' does not exist")
        return None

    def adapter_of(model: str) -> str | None:
        return None if model == BASE else model

    @app.post("/generate")
    async def generate(body: dict[str, Any]) -> Any:
        state.last_json = body
        params = body.get("parameters") or {}
        limit = params.get("max_new_tokens", 20)
        if limit > MAX_NEW_TOKENS:
            return error(422, "invalid_request_error", "parameters.max_new_tokens: must be <= 100")
        if (missing := unknown(params.get("adapter_id"))) is not None:
            return missing
        tokens = reply_tokens(body["inputs"], params.get("adapter_id"), limit)
        return {"generated_text": "".join(tokens), "details": details(body, tokens, limit)}

    def details(body: dict[str, Any], tokens: list[str], limit: int) -> dict[str, Any]:
        params = body.get("parameters") or {}
        return {
            "finish_reason": "length" if len(tokens) == limit else "eos",
            "generated_tokens": len(tokens),
            "prompt_tokens": len(body["inputs"].split()),
            "seed": params.get("seed"),
            "adapter_id": params.get("adapter_id"),
        }

    @app.post("/generate_stream")
    async def generate_stream(body: dict[str, Any]) -> Any:
        state.last_json = body
        params = body.get("parameters") or {}
        if (missing := unknown(params.get("adapter_id"))) is not None:
            return missing
        limit = params.get("max_new_tokens", 20)
        tokens = reply_tokens(body["inputs"], params.get("adapter_id"), limit)

        def events() -> Iterator[str]:
            yield ": keep-alive comment\n\n"
            for i, text in enumerate(tokens):
                token = {"id": 100 + i, "text": text, "logprob": -0.5 * i, "special": False}
                yield sse({"token": token, "generated_text": None, "details": None})
            eos = {"id": 2, "text": "</s>", "logprob": 0.0, "special": True}
            final = {"generated_text": "".join(tokens), "details": details(body, tokens, limit)}
            yield sse({"token": eos, **final})

        return StreamingResponse(events(), media_type="text/event-stream")

    def openai_stream(chunks: list[dict[str, Any]]) -> StreamingResponse:
        def events() -> Iterator[str]:
            for chunk in chunks:
                yield sse(chunk)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: dict[str, Any]) -> Any:
        state.last_json = body
        adapter = adapter_of(body["model"])
        if (missing := unknown(adapter)) is not None:
            return missing
        tokens = reply_tokens(body["prompt"], adapter, body.get("max_tokens", 20))
        base = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": body["model"]}
        if body.get("stream"):
            chunks = [
                {**base, "choices": [{"index": 0, "text": t, "finish_reason": None}]}
                for t in tokens
            ]
            chunks.append({**base, "choices": [{"index": 0, "text": "", "finish_reason": "stop"}]})
            return openai_stream(chunks)
        choice = {"index": 0, "text": "".join(tokens), "finish_reason": "stop"}
        usage = {
            "prompt_tokens": 3,
            "completion_tokens": len(tokens),
            "total_tokens": 3 + len(tokens),
        }
        return {**base, "choices": [choice], "usage": usage}

    @app.post("/v1/chat/completions")
    async def chat(body: dict[str, Any]) -> Any:
        state.last_json = body
        adapter = adapter_of(body["model"])
        if (missing := unknown(adapter)) is not None:
            return missing
        turns = sum(1 for m in body["messages"] if m["role"] == "user")
        last = body["messages"][-1]["content"]
        tokens = [*reply_tokens(last, adapter, 20), f" (turn {turns})"]
        base = {"id": "chat-1", "created": 1, "model": body["model"]}
        if body.get("stream"):
            first = {"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}
            chunks = [{**base, "object": "chat.completion.chunk", "choices": [first]}]
            for t in tokens:
                choice = {"index": 0, "delta": {"content": t}, "finish_reason": None}
                chunks.append({**base, "object": "chat.completion.chunk", "choices": [choice]})
            end = {"index": 0, "delta": {}, "finish_reason": "stop"}
            chunks.append({**base, "object": "chat.completion.chunk", "choices": [end]})
            return openai_stream(chunks)
        message = {"role": "assistant", "content": "".join(tokens)}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return {**base, "object": "chat.completion", "choices": [choice]}

    @app.get("/v1/models")
    async def models() -> Any:
        data = [
            {"id": BASE, "object": "model", "owned_by": "flora", "parent": None, "status": "loaded"}
        ]
        data += [
            {"id": a, "object": "model", "owned_by": "flora", "parent": BASE, "status": "stored"}
            for a in sorted(state.adapters)
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/embeddings")
    async def embeddings(body: dict[str, Any]) -> Any:
        state.last_json = body
        adapter = adapter_of(body["model"])
        if (missing := unknown(adapter)) is not None:
            return missing
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": [float(len(t)), float(t.count("a")), 1.0 if adapter else 0.0],
            }
            for i, t in enumerate(body["input"])
        ]
        return {"object": "list", "data": data, "model": body["model"]}

    def ranked(content: bytes, top_k: int) -> list[dict[str, Any]]:
        # The label whose index is len(content) % 6 wins; the rest follow in order.
        best = len(content) % len(LABELS)
        order = [best] + [i for i in range(len(LABELS)) if i != best]
        return [
            {"label": LABELS[i], "score": round(0.9 / (rank + 1), 6), "index": i}
            for rank, i in enumerate(order[:top_k])
        ]

    @app.post("/v1/classify")
    async def classify(request: Request) -> Any:
        if request.headers.get("content-type", "").startswith("multipart/"):
            form = await request.form()
            uploads = form.getlist("files")
            contents = [await f.read() for f in uploads]  # type: ignore[union-attr]
            state.last_form = {
                "adapter_id": form.get("adapter_id"),
                "top_k": form.get("top_k"),
                "filenames": [f.filename for f in uploads],  # type: ignore[union-attr]
            }
            adapter, top_k = form.get("adapter_id"), int(str(form.get("top_k", "5")))
        else:
            body = await request.json()
            state.last_json = body
            contents = [str(t).encode() for t in body["inputs"]]
            adapter, top_k = body.get("adapter_id"), body.get("top_k", 5)
        if (missing := unknown(adapter if isinstance(adapter, str) else None)) is not None:
            return missing
        return {"results": [ranked(c, top_k) for c in contents]}

    @app.post("/v1/adapters")
    async def upload(request: Request) -> Any:
        if int(request.headers.get("content-length", "0")) > state.max_upload_bytes:
            limit = state.max_upload_bytes
            return error(413, "payload_too_large", f"upload larger than {limit} bytes")
        form = await request.form()
        adapter_id = str(form.get("adapter_id"))
        parts = {name: form.get(name) for name in ("config", "weights", "archive")}
        state.last_form = {
            "adapter_id": adapter_id,
            "sha256": form.get("sha256"),
            "parts": sorted(k for k, v in parts.items() if v is not None),
            "overwrite": request.query_params.get("overwrite"),
        }
        # As the real server: the form's sha256 covers the archive, or the weights file; the
        # stored digest covers what is stored (here: config + weights).
        if parts["archive"] is not None:
            blob = await parts["archive"].read()  # type: ignore[union-attr]
            checked = blob
            config: dict[str, Any] = {"format": "single-file"}
        elif parts["config"] is not None and parts["weights"] is not None:
            raw = await parts["config"].read()  # type: ignore[union-attr]
            checked = await parts["weights"].read()  # type: ignore[union-attr]
            try:
                config = json.loads(raw)
            except ValueError:
                return error(422, "invalid_adapter", "invalid adapter: config is not JSON")
            blob = raw + checked
        else:
            return error(422, "invalid_request_error", "archive: send config + weights, or archive")
        sent = form.get("sha256")
        if sent is not None and sent != hashlib.sha256(checked).hexdigest():
            return error(400, "invalid_request_error", "sha256 does not match the upload")
        digest = hashlib.sha256(blob).hexdigest()
        existing = state.adapters.get(adapter_id)
        if existing is not None and existing["sha256"] == digest:
            return JSONResponse({**existing, "status": "unchanged"}, status_code=200)
        if existing is not None and request.query_params.get("overwrite") != "true":
            return error(409, "conflict_error", f"adapter '{adapter_id}' exists with other bytes")
        info = {
            "id": adapter_id,
            "sha256": digest,
            "size_bytes": len(blob),
            "created": 1_700_000_000,
            "location": "stored",
            "config": config,
        }
        state.adapters[adapter_id] = info
        status = "created" if existing is None else "replaced"
        code = 201 if existing is None else 200
        return JSONResponse({**info, "status": status}, status_code=code)

    @app.get("/v1/adapters")
    async def list_adapters(limit: int = 20, offset: int = 0, after: str | None = None) -> Any:
        ids = sorted(state.adapters)
        total = len(ids)
        if after is not None:
            ids = [i for i in ids if i > after]
        page_ids = ids[offset : offset + limit]
        has_more = len(ids) > offset + limit
        return {
            "object": "list",
            "data": [state.adapters[i] for i in page_ids],
            "total": total,
            "has_more": has_more,
            "next_after": page_ids[-1] if has_more else None,
        }

    @app.get("/v1/adapters/{adapter_id}")
    async def get_adapter(adapter_id: str) -> Any:
        if adapter_id not in state.adapters:
            return error(404, "not_found_error", f"adapter '{adapter_id}' does not exist")
        return state.adapters[adapter_id]

    @app.delete("/v1/adapters/{adapter_id}")
    async def delete_adapter(adapter_id: str) -> Any:
        if state.adapters.pop(adapter_id, None) is None:
            return error(404, "not_found_error", f"adapter '{adapter_id}' does not exist")
        return {"id": adapter_id, "deleted": True}

    @app.get("/health")
    async def health() -> Any:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Any:
        if not state.ready:
            return error(503, "not_ready", "model loading", "1")
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics() -> Any:
        return PlainTextResponse("flora_requests_total 7\n")

    return app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve(state: StubState) -> Iterator[str]:
    """Run the stub with uvicorn on 127.0.0.1 in a thread; yield its base URL."""
    port = free_port()
    config = uvicorn.Config(build_app(state), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("stub server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=5)
