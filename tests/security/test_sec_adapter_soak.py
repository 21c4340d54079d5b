"""Issue 14 item 2, soak: a real `flora-serve` process (the tiny real-torch Llama, the same
registry, cache and engine code as any model) serves three clients while a writer
overwrites, deletes and re-creates an adapter on all seven projections, as fast as the
server acknowledges. Every generation reports the sha256 that served it
(`X-Adapter-Sha256`); each must be one the adapter could legally have had while that request
was in flight: the state after the last write acknowledged before the request was sent, or
that of a write still running or started before the answer came. One slot (`--max-slots 1`)
and a second adapter keep the copy moving between device, host cache and store, where the
races were. Bounded: `SOAK_SECONDS` of writes."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from tiny import make_adapter_dirs, make_model_dir, running_server, upload_files

from flora.adapter import pack_single_file

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SOAK_SECONDS = 30.0
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _adapters(model_dir: Path, out: Path, seeds: list[int]) -> list[Path]:
    """Large adapters: rank 16 on every projection, so a load is not instant."""
    return make_adapter_dirs(model_dir, out, seeds, rank=16, targets=PROJECTIONS, prefix="big")


@dataclass
class Ledger:
    """The writer's acknowledged history: (sent, acknowledged, state) per write, where the
    state is the sha256 stored after it, or None once deleted."""

    initial: str | None
    writes: list[tuple[float, float, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def allowed(self, sent: float, answered: float) -> set[str | None]:
        with self.lock:
            writes = list(self.writes)
        before = [w for w in writes if w[1] <= sent]
        states = {before[-1][2] if before else self.initial}
        states |= {state for start, ack, state in writes if ack > sent and start < answered}
        return states


def test_overwrite_delete_recreate_while_generating_serves_no_stale_bytes(tmp_path):
    work = tmp_path
    model_dir = make_model_dir(work / "model")
    versions = _adapters(model_dir, work / "adapters", [21, 22, 23])
    shas = [
        pack_single_file(d / "adapter_config.json", d / "adapter.safetensors", work / f"{i}.flora")
        for i, d in enumerate(versions)
    ]
    flags = ("--max-slots", "1", "--max-batch-size", "4", "--store-recheck-seconds", "60")
    with running_server(model_dir, work / "store", *flags) as server:
        url = server.url
        for adapter_id, directory in (("big", versions[0]), ("steady", versions[1])):
            r = httpx.post(
                f"{url}/v1/adapters", data={"adapter_id": adapter_id}, files=upload_files(directory)
            )
            assert r.status_code == 201, r.text
        ledger = Ledger(initial=shas[0])
        stop = threading.Event()
        results: list[tuple[float, float, int, str | None]] = []
        failures: list[str] = []

        def generate(adapter_id: str) -> None:
            with httpx.Client(timeout=60) as client:
                while not stop.is_set():
                    body = {
                        "inputs": "hi",
                        "parameters": {"adapter_id": adapter_id, "max_new_tokens": 4},
                    }
                    sent = time.monotonic()
                    r = client.post(f"{url}/generate", json=body)
                    answered = time.monotonic()
                    if r.status_code >= 500 or r.status_code not in (200, 404):
                        failures.append(f"{adapter_id}: {r.status_code} {r.text[:200]}")
                    elif adapter_id == "big":
                        served = r.headers.get("x-adapter-sha256") if r.status_code == 200 else None
                        if r.status_code == 200:
                            assert r.json()["details"]["adapter_sha256"] == served
                        results.append((sent, answered, r.status_code, served))
                    elif r.headers.get("x-adapter-sha256") != shas[1]:
                        failures.append(f"steady served {r.headers.get('x-adapter-sha256')}")

        def write() -> None:
            rng = random.Random(14)
            state: str | None = shas[0]
            with httpx.Client(timeout=60) as client:
                deadline = time.monotonic() + SOAK_SECONDS
                while time.monotonic() < deadline:
                    sent = time.monotonic()
                    if state is None or rng.random() < 0.6:
                        i = rng.choice([i for i in range(3) if shas[i] != state])
                        query = "" if state is None else "?overwrite=true"
                        r = client.post(
                            f"{url}/v1/adapters{query}",
                            data={"adapter_id": "big"},
                            files=upload_files(versions[i]),
                        )
                        want = 201 if state is None else 200
                        new_state: str | None = shas[i]
                    else:
                        r = client.delete(f"{url}/v1/adapters/big")
                        want, new_state = 200, None
                    if r.status_code != want:
                        failures.append(f"write: {r.status_code} {r.text[:200]}")
                        break
                    with ledger.lock:
                        ledger.writes.append((sent, time.monotonic(), new_state))
                    state = new_state
                    time.sleep(rng.uniform(0.05, 0.6))
            stop.set()

        threads = [threading.Thread(target=generate, args=(a,)) for a in ("big", "big", "steady")]
        threads.append(threading.Thread(target=write))
        for t in threads:
            t.start()
        for t in threads:
            t.join(SOAK_SECONDS + 120)
        assert not any(t.is_alive() for t in threads)
        assert server.proc.poll() is None, server.log()

    assert failures == []
    stale = [
        (sent, served, ledger.allowed(sent, answered))
        for sent, answered, _, served in results
        if served not in ledger.allowed(sent, answered)
    ]
    served_versions = {served for *_, served in results}
    print(
        f"soak: {len(ledger.writes)} writes, {len(results)} generations, "
        f"{sum(1 for r in results if r[2] == 404)} 404s, {len(stale)} stale"
    )
    assert stale == []
    assert len(ledger.writes) >= 20 and len(results) >= 100
    assert set(shas) <= served_versions and None in served_versions  # every state was seen
