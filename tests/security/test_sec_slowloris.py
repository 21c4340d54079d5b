"""Issue 14, item 5: slowloris. A request head that arrives one byte a second is closed after
`--header-timeout`; idle connections (before the first request and between requests) are
closed; with more slow sockets than `--max-connections`, `/health` and `/ready` still answer
200 on `--probe-port`. Raw sockets against a real `flora-serve` process."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest
from tiny import free_port, make_model_dir, running_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

HEADER_TIMEOUT = 2.0
KEEP_ALIVE = 1.0
MAX_CONNECTIONS = 16
SLACK = 3.0  # event-loop delay on a loaded CI machine; the head would need ~35 s to finish


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("slowloris")
    model_dir = make_model_dir(work / "model")
    probe_port = free_port()
    flags = [
        "--header-timeout", str(HEADER_TIMEOUT), "--keep-alive-timeout", str(KEEP_ALIVE),
        "--max-connections", str(MAX_CONNECTIONS), "--probe-port", str(probe_port),
    ]  # fmt: skip
    with running_server(model_dir, work / "store", *flags) as srv:
        srv.probe_url = f"http://127.0.0.1:{probe_port}"
        yield srv


def _connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    return sock


def _get_ok(sock: socket.socket, path: str) -> None:
    """One complete request and 200 answer (read to its Content-Length) on `sock`."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    sock.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += sock.recv(4096)


def _seconds_until_closed(sock: socket.socket, trickle: bytes = b"", limit: float = 10) -> tuple:
    """Send `trickle` one byte a second until the server closes; (seconds, bytes received)."""
    start = time.monotonic()
    received = b""
    sock.settimeout(0.2)
    sent = 0
    next_byte = start
    while time.monotonic() - start < limit:
        if sent < len(trickle) and time.monotonic() >= next_byte:
            try:
                sock.sendall(trickle[sent : sent + 1])
            except OSError:
                break
            sent += 1
            next_byte += 1.0
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            break
        if not chunk:
            break
        received += chunk
    return time.monotonic() - start, received


def test_head_sent_one_byte_a_second_is_closed_with_408(server):
    with _connect(server.url) as sock:
        took, answer = _seconds_until_closed(sock, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    # Two or three bytes made it in; without the timeout the head would complete.
    assert HEADER_TIMEOUT - 0.2 <= took <= HEADER_TIMEOUT + SLACK, took
    assert answer.startswith(b"HTTP/1.1 408 "), answer


def test_idle_connections_are_closed(server):
    # Connected, nothing sent: closed at the head timeout, without an answer.
    with _connect(server.url) as sock:
        took, answer = _seconds_until_closed(sock)
    assert HEADER_TIMEOUT - 0.2 <= took <= HEADER_TIMEOUT + SLACK and answer == b"", (took, answer)
    # After one answered request, an idle kept-alive connection: the keep-alive timeout.
    with _connect(server.url) as sock:
        _get_ok(sock, "/health")
        took, answer = _seconds_until_closed(sock)
    assert took <= KEEP_ALIVE + SLACK and answer == b"", (took, answer)


def test_slow_second_head_on_a_kept_alive_connection_is_closed(server):
    # uvicorn stops its keep-alive timer at the first byte of the next request; the head
    # timer takes over from there.
    with _connect(server.url) as sock:
        _get_ok(sock, "/health")
        took, answer = _seconds_until_closed(sock, b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
    assert HEADER_TIMEOUT - 0.2 <= took <= HEADER_TIMEOUT + SLACK, took
    assert answer.startswith(b"HTTP/1.1 408 "), answer


def test_probes_answer_on_the_probe_port_while_the_main_port_is_exhausted(server):
    stop = threading.Event()
    socks = [_connect(server.url) for _ in range(MAX_CONNECTIONS + 8)]

    def trickle() -> None:
        for i in range(30):
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.send(b"GET /health HTTP/1.1\r\n"[i : i + 1])
            if stop.wait(0.5):
                return

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        time.sleep(0.3)
        # The main port is saturated: uvicorn answers 503 to everything, probes included.
        r = httpx.get(f"{server.url}/health", timeout=5)
        assert r.status_code == 503, r.text
        for path in ("/health", "/ready"):
            r = httpx.get(f"{server.probe_url}{path}", timeout=5)
            assert r.status_code == 200, (path, r.status_code, r.text)
        assert r.json()["status"] == "ready"
        # The probe port serves nothing else.
        r = httpx.post(f"{server.probe_url}/generate", json={"inputs": "hi"}, timeout=5)
        assert r.status_code == 404 and "probe port" in r.json()["error"]["message"]
        # The slow sockets are cut at the head timeout; the main port recovers by itself.
        deadline = time.monotonic() + HEADER_TIMEOUT + 3
        while httpx.get(f"{server.url}/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the main port did not recover"
            time.sleep(0.2)
    finally:
        stop.set()
        sender.join()
        for sock in socks:
            sock.close()
    assert server.proc.poll() is None, server.log()


def test_sigterm_stops_both_listeners_with_status_0(server):
    # Runs last: the probe listener must not keep the process alive after the main one.
    assert httpx.get(f"{server.probe_url}/health", timeout=5).status_code == 200
    server.signal(signal.SIGTERM)
    assert server.proc.wait(15) == 0, server.log()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.probe_url}/health", timeout=2)
    assert "Traceback" not in server.log(), server.log()
