"""Property 12 (continued): streams still running when `--shutdown-timeout` expires end
with a final error event and a cleanly closed body, never a cut chunked response.

A real `flora-serve` process on the tiny Llama: four long streams (TGI, OpenAI completions
and chat), SIGTERM, a one-second drain; each stream must then end with an error event
(`service_unavailable`, and `data: [DONE]` after it in the OpenAI shape), read to its end
without a transport error, and the process exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
from tiny import server_fixtures, start_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

N = 50000  # far more tokens than the drain leaves time for
BASE = "base"  # replaced by the served model's name


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    fx = server_fixtures()
    path = tmp_path_factory.mktemp("tiny") / "model"
    m = fx.make_tiny_llama()
    m.config.max_position_embeddings = 65536  # room for long generations (rope needs no table)
    m.save_pretrained(path)
    fx.make_char_tokenizer().save_pretrained(path)
    return path


def _read(url: str, path: str, body: dict, started: threading.Event, out: dict) -> None:
    """Every `data:` payload of one stream, and the transport error if the body broke."""
    events: list[object] = []
    try:
        with httpx.stream("POST", url + path, json=body, timeout=120) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    payload = line[len("data: ") :]
                    events.append(payload if payload == "[DONE]" else json.loads(payload))
                    started.set()
    except httpx.TransportError as exc:
        out["error"] = repr(exc)
    finally:
        out["events"] = events
        started.set()


STREAMS = {
    "tgi-1": ("/generate_stream", {"inputs": "hello", "parameters": {"max_new_tokens": N}}),
    "tgi-2": ("/generate_stream", {"inputs": "world", "parameters": {"max_new_tokens": N}}),
    "completions": (
        "/v1/completions",
        {"model": BASE, "prompt": "hi", "max_tokens": N, "temperature": 0, "stream": True},
    ),
    "chat": (
        "/v1/chat/completions",
        {
            "model": BASE,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": N,
            "temperature": 0,
            "stream": True,
        },
    ),
}


def _assert_error_event(event: object, name: str, out: dict) -> None:
    """`{"error": {"type", "message"}}`, or TGI's flat `{"error": MESSAGE, "error_type"}`."""
    assert isinstance(event, dict) and "error" in event, (name, event, out.get("error"))
    error = event["error"]
    if isinstance(error, str):
        assert name.startswith("tgi"), (name, event)
        error = {"message": error, "type": event.get("error_type")}
    assert error["type"] in ("service_unavailable", "overloaded"), (name, event)
    assert "shutting down" in error["message"], (name, event)


@pytest.mark.parametrize("stop", ["drain", "second-sigterm", "sigint"])
def test_streams_cut_by_the_shutdown_timeout_end_with_an_error_event(model_dir, tmp_path, stop):
    """Also when the server is stopped at once (a second SIGTERM, or SIGINT: no drain):
    the streams still end with an error event and a clean body."""
    timeout = "1" if stop == "drain" else "60"
    server = start_server(
        model_dir, tmp_path / "store", "--shutdown-timeout", timeout, "--max-new-tokens", str(N)
    )
    try:
        base = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]["id"]
        streams = {
            name: (path, {**body, "model": base} if "model" in body else body)
            for name, (path, body) in STREAMS.items()
        }
        outs = {name: {} for name in STREAMS}
        started = {name: threading.Event() for name in STREAMS}
        threads = [
            threading.Thread(target=_read, args=(server.url, path, body, started[name], outs[name]))
            for name, (path, body) in streams.items()
        ]
        for t in threads:
            t.start()
        assert all(e.wait(60) for e in started.values())
        if stop == "sigint":
            server.signal(signal.SIGINT)
        else:
            server.signal(signal.SIGTERM)
        if stop == "second-sigterm":
            time.sleep(0.5)
            server.signal(signal.SIGTERM)
        began = time.monotonic()
        # uvicorn re-raises a signal that stopped it at once: the status says which
        want = {"drain": 0, "second-sigterm": -signal.SIGTERM, "sigint": -signal.SIGINT}[stop]
        assert server.proc.wait(60) == want, server.log()
        assert time.monotonic() - began < 20
        for t in threads:
            t.join(30)
            assert not t.is_alive()
        for name, out in outs.items():
            assert out.get("status") == 200, (name, out.get("status"), server.log())
            assert "error" not in out, (name, out["error"], server.log())  # a clean end
            events = out["events"]
            if name.startswith("tgi"):
                *tokens, last = events
                _assert_error_event(last, name, out)
                assert tokens and all(e["details"] is None for e in tokens), name
            else:
                *chunks, error, done = events
                assert done == "[DONE]", (name, events[-3:])
                _assert_error_event(error, name, out)
                assert chunks and all(c["choices"][0]["finish_reason"] is None for c in chunks)
            assert len(events) < N  # cut by the shutdown, not finished
    finally:
        if server.proc.poll() is None:
            server.signal(signal.SIGKILL)
            server.proc.wait(10)
