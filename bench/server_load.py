"""Item 6: a real `flora-serve` under open-loop HTTP load (full bench only).

One server on 127.0.0.1 (SmolLM2-135M by default), ``adapters`` random rank-8 FLoRA
adapters on q_proj/v_proj uploaded through ``POST /v1/adapters``, then for each request
rate lambda an **open-loop** generator: arrival times are a Poisson process (independent
exponential gaps of mean 1/lambda), each request is sent at its time whatever the server's
backlog (a closed loop would slow down with the server and hide queueing). Each request
names adapter i (1-based) with Zipf probability p_i = i^-s / sum_j j^-s (s = 1.1), asks
``max_new_tokens`` greedy tokens on ``POST /generate_stream`` and reads the SSE stream.

Per rate: completed req/s and generated tokens/s over the window from the first arrival
to the last completion; TTFT (send -> first token event; TGI's stream holds each token
until the next one is known, so this includes the second token's step) and end-to-end
p50/p99; counts by HTTP status (429 = the queue said no; goal: no 5xx) and errors reported
inside a 200 stream. Bounded: each rate runs ``duration_s`` or ``max_requests``, whichever
ends first, then waits at most ``drain_s`` for stragglers (cancelled ones count "timeout").

``python -m bench.server_load [--quick-run] [--model DIR]`` runs it alone and prints JSON.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench import serverbench as sb

PROMPTS = (
    "The capital of France is",
    "Write one sentence about the sea.",
    "List three colours:",
    "Once upon a time",
    "The best way to learn a language is",
    "def fibonacci(n):",
)


@dataclass
class LoadConfig:
    model: str = sb.DEFAULT_MODEL
    adapters: int = 100
    rank: int = 8
    rates: tuple[float, ...] = (0.5, 1.0, 2.0)
    duration_s: float = 30.0
    max_requests: int = 60
    max_new_tokens: int = 16
    zipf_s: float = 1.1
    drain_s: float = 120.0
    seed: int = 0
    server_flags: list[str] = field(
        default_factory=lambda: ["--max-slots", "16", "--max-batch-size", "32"]
    )


def quick_config(model: str = sb.DEFAULT_MODEL) -> LoadConfig:
    """A smoke test: a few requests at one rate over 20 adapters."""
    return LoadConfig(model=model, adapters=20, rates=(1.0,), duration_s=8.0, max_requests=6)


def zipf_weights(n: int, s: float) -> list[float]:
    """p_i = i^-s / sum_j j^-s for i = 1..n."""
    raw = [(i + 1) ** -s for i in range(n)]
    total = sum(raw)
    return [w / total for w in raw]


@dataclass
class Outcome:
    status: str  # HTTP status, "stream_error", "transport" or "timeout"
    ttft_s: float | None = None
    e2e_s: float | None = None
    tokens: int = 0
    done_at: float | None = None
    error_type: str | None = None


async def one_request(
    client: httpx.AsyncClient, url: str, adapter_id: str, prompt: str, max_new_tokens: int
) -> Outcome:
    body = {
        "inputs": prompt,
        "parameters": {"adapter_id": adapter_id, "max_new_tokens": max_new_tokens},
    }
    start = time.perf_counter()
    out = Outcome(status="transport")
    try:
        async with client.stream("POST", f"{url}/generate_stream", json=body) as r:
            out.status = str(r.status_code)
            if r.status_code != 200:
                await r.aread()
                out.e2e_s = time.perf_counter() - start
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    out.status = "stream_error"
                    err = event["error"]
                    # Nested, or TGI's flat shape on /generate_stream.
                    flat = event.get("error_type", str(err))
                    out.error_type = err.get("type") if isinstance(err, dict) else flat
                    break
                if out.ttft_s is None and event.get("token") is not None:
                    out.ttft_s = time.perf_counter() - start
                if event.get("details") is not None:
                    out.tokens = int(event["details"]["generated_tokens"])
    except httpx.HTTPError as exc:
        out.status, out.error_type = "transport", type(exc).__name__
    out.done_at = time.perf_counter()
    out.e2e_s = out.done_at - start
    return out


async def run_rate(
    url: str, adapter_ids: list[str], rate: float, cfg: LoadConfig, seed: int
) -> dict[str, Any]:
    """One open-loop phase at ``rate`` requests/s."""
    rng = random.Random(seed)
    weights = zipf_weights(len(adapter_ids), cfg.zipf_s)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    tasks: list[asyncio.Task[Outcome]] = []
    chosen: list[int] = []
    async with httpx.AsyncClient(timeout=sb.HTTP_TIMEOUT, limits=limits) as client:
        t0 = time.perf_counter()
        at = 0.0
        while len(tasks) < cfg.max_requests:
            at += rng.expovariate(rate)
            if at > cfg.duration_s:
                break
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            idx = rng.choices(range(len(adapter_ids)), weights)[0]
            chosen.append(idx)
            prompt = PROMPTS[rng.randrange(len(PROMPTS))]
            tasks.append(
                asyncio.create_task(
                    one_request(client, url, adapter_ids[idx], prompt, cfg.max_new_tokens)
                )
            )
        sent_for = time.perf_counter() - t0
        done, pending = await asyncio.wait(tasks, timeout=cfg.drain_s) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        outcomes = [t.result() if t in done else Outcome(status="timeout") for t in tasks]
    return summarize(rate, outcomes, t0, sent_for, chosen)


def summarize(
    rate: float, outcomes: list[Outcome], t0: float, sent_for: float, chosen: list[int]
) -> dict[str, Any]:
    ok = [o for o in outcomes if o.status == "200"]
    last = max((o.done_at for o in ok if o.done_at is not None), default=t0)
    window = max(last - t0, 1e-9)
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    server_errors = sum(v for k, v in counts.items() if k.isdigit() and int(k) >= 500) + sum(
        1 for o in outcomes if o.status == "stream_error" and o.error_type == "server_error"
    )
    return {
        "rate_req_s": rate,
        "sent": len(outcomes),
        "sent_over_s": sent_for,
        "offered_req_s": len(outcomes) / sent_for if sent_for > 0 else None,
        "distinct_adapters": len(set(chosen)),
        "completed": len(ok),
        "window_s": window,
        "throughput_req_s": len(ok) / window,
        "throughput_tok_s": sum(o.tokens for o in ok) / window,
        "ttft_s": sb.percentiles([o.ttft_s for o in ok if o.ttft_s is not None]),
        "e2e_s": sb.percentiles([o.e2e_s for o in ok if o.e2e_s is not None]),
        "status_counts": counts,
        "count_429": counts.get("429", 0),
        "count_5xx": server_errors,
        "stream_errors": sorted({o.error_type or "" for o in outcomes if o.error_type}),
    }


async def _main_async(url: str, ids: list[str], paths: list[Path], cfg: LoadConfig) -> dict:
    t = time.perf_counter()
    uploads = await sb.upload_all(url, ids, paths)
    upload_s = time.perf_counter() - t
    # Context for the loaded numbers: requests one at a time on an idle server (the first
    # pays the adapter's cold load, the later ones are warm).
    idle = []
    async with httpx.AsyncClient(timeout=sb.HTTP_TIMEOUT) as client:
        for _ in range(3):
            o = await one_request(client, url, ids[0], PROMPTS[0], cfg.max_new_tokens)
            idle.append({"status": o.status, "ttft_s": o.ttft_s, "e2e_s": o.e2e_s,
                         "tokens": o.tokens})  # fmt: skip
    phases = []
    for i, rate in enumerate(cfg.rates):
        phases.append(await run_rate(url, ids, rate, cfg, cfg.seed + i))
    return {
        "upload_status_counts": uploads,
        "upload_s": upload_s,
        "idle_sequential": idle,
        "rates": phases,
    }


def run(cfg: LoadConfig, log: Any = print) -> dict[str, Any]:
    """Make and upload the adapters, run every rate; the ``server_load`` result dict."""
    with sb.scratch_dir("flora-bench-load-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        paths = sb.make_adapters(cfg.model, root / "made", cfg.adapters, rank=cfg.rank)
        log(f"server_load: {len(paths)} adapters made in {time.perf_counter() - t:.1f} s")
        ids = [f"load-{i:03d}" for i in range(cfg.adapters)]
        with sb.running_server(cfg.model, root, *cfg.server_flags) as server:
            log(f"server_load: server ready at {server.url}")
            result = asyncio.run(_main_async(server.url, ids, paths, cfg))
            result["server_rss_bytes_after"] = server.rss()
    result["config"] = asdict(cfg)
    result["count_5xx"] = sum(p["count_5xx"] for p in result["rates"])
    result["count_429"] = sum(p["count_429"] for p in result["rates"])
    return result


def main(argv: list[str] | None = None) -> int:
    full = lambda model: LoadConfig(model=model)  # noqa: E731
    return sb.cli(__doc__, run, quick_config, full, "a smoke test: few requests", argv)


if __name__ == "__main__":
    raise SystemExit(main())
