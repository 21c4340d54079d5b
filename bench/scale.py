"""Item 7: a server with 1,000 registered adapters (full bench only).

One `flora-serve` on 127.0.0.1 (SmolLM2-135M by default) with small cache budgets
(``--max-slots``, ``--host-cache-bytes``); ``adapters`` small random FLoRA adapters (rank 1
on q_proj: about 0.16 MB each for SmolLM2) uploaded through ``POST /v1/adapters``; then
``touch`` of them are used once each by ``POST /generate`` so the host cache fills past its
budget and the device slots turn over.

Memory: the server's RSS is read after start-up and one base-model generation (``base``:
weights, KV buffers, slot banks allocated at start), after the uploads and after the
touches. The check is

    rss_after_touch <= rss_base + host_cache_bytes + max_slots * adapter_bytes + allowance

where ``adapter_bytes`` is one archive's size (the folded form a slot holds is the same
number of floats) and ``allowance`` (64 MiB) covers what is not an adapter cache: the
registry's metadata for every stored adapter, request and upload buffers, allocator slack.
RSS is not returned to the OS eagerly, so this is an upper-bound check, not a measurement
of the caches themselves.

Latency: ``GET /v1/models`` (the base and every adapter) ``models_calls`` times, one at a
time after a few warm-up calls; p50/p99 and the response size.

``python -m bench.scale [--quick-run] [--model DIR]`` runs it alone and prints JSON.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from bench import serverbench as sb

MIB = 1024 * 1024


@dataclass
class ScaleConfig:
    model: str = sb.DEFAULT_MODEL
    adapters: int = 1000
    rank: int = 1
    targets: tuple[str, ...] = ("q_proj",)
    max_slots: int = 4
    host_cache_bytes: int = 4 * MIB
    touch: int = 60
    models_calls: int = 50
    allowance_bytes: int = 64 * MIB
    seed: int = 0


def quick_config(model: str = sb.DEFAULT_MODEL) -> ScaleConfig:
    """A smoke test: 100 adapters, 12 touched, 20 listings."""
    return ScaleConfig(model=model, adapters=100, touch=12, models_calls=20)


async def touch_all(url: str, ids: list[str], concurrency: int = 4) -> dict[str, int]:
    """One 2-token greedy generation per adapter; counts by HTTP status."""
    counts: dict[str, int] = {}
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=sb.HTTP_TIMEOUT) as client:

        async def one(adapter_id: str) -> None:
            async with sem:
                r = await client.post(
                    f"{url}/generate",
                    json={
                        "inputs": "Hello",
                        "parameters": {"adapter_id": adapter_id, "max_new_tokens": 2},
                    },
                )
            counts[str(r.status_code)] = counts.get(str(r.status_code), 0) + 1

        await asyncio.gather(*(one(a) for a in ids))
    return counts


def models_latency(url: str, calls: int, expect: int) -> dict[str, Any]:
    """Sequential ``GET /v1/models``; checks every listing holds ``expect`` entries."""
    times, sizes, bad = [], [], 0
    with httpx.Client(timeout=sb.HTTP_TIMEOUT) as client:
        for i in range(calls + 3):
            t = time.perf_counter()
            r = client.get(f"{url}/v1/models")
            dt = time.perf_counter() - t
            if r.status_code != 200 or len(r.json()["data"]) != expect:
                bad += 1
            if i >= 3:  # the first calls warm the connection and the registry listing
                times.append(dt)
                sizes.append(len(r.content))
    return {
        "latency_s": sb.percentiles(times),
        "response_bytes": max(sizes, default=0),
        "entries_expected": expect,
        "bad_listings": bad,
    }


def _generate_base(url: str) -> int:
    r = httpx.post(
        f"{url}/generate",
        json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}},
        timeout=sb.HTTP_TIMEOUT,
    )
    return r.status_code


def run(cfg: ScaleConfig, log: Any = print) -> dict[str, Any]:
    """Make, upload and touch the adapters; the ``scale`` result dict."""
    flags = ["--max-slots", str(cfg.max_slots), "--host-cache-bytes", str(cfg.host_cache_bytes)]
    out: dict[str, Any] = {"config": asdict(cfg)}
    with sb.scratch_dir("flora-bench-scale-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        paths = sb.make_adapters(
            cfg.model, root / "made", cfg.adapters, rank=cfg.rank, targets=cfg.targets
        )
        log(f"scale: {len(paths)} adapters made in {time.perf_counter() - t:.1f} s")
        adapter_bytes = max(p.stat().st_size for p in paths)
        ids = [f"scale-{i:04d}" for i in range(cfg.adapters)]
        with sb.running_server(cfg.model, root, *flags) as server:
            out["warmup_status"] = _generate_base(server.url)
            rss_base = server.rss()
            t = time.perf_counter()
            out["upload_status_counts"] = asyncio.run(sb.upload_all(server.url, ids, paths))
            out["upload_s"] = time.perf_counter() - t
            log(f"scale: {cfg.adapters} uploaded in {out['upload_s']:.1f} s")
            rss_uploaded = server.rss()
            step = max(1, cfg.adapters // max(cfg.touch, 1))
            touched = ids[::step][: cfg.touch]
            t = time.perf_counter()
            out["touch_status_counts"] = asyncio.run(touch_all(server.url, touched))
            out["touch_s"] = time.perf_counter() - t
            rss_touched = server.rss()
            out["models"] = models_latency(server.url, cfg.models_calls, cfg.adapters + 1)
            rss_end = server.rss()
    budget = cfg.host_cache_bytes + cfg.max_slots * adapter_bytes + cfg.allowance_bytes
    out.update(
        {
            "adapter_bytes": adapter_bytes,
            "touched": len(touched),
            "touched_bytes": len(touched) * adapter_bytes,
            "rss_base_bytes": rss_base,
            "rss_after_upload_bytes": rss_uploaded,
            "rss_after_touch_bytes": rss_touched,
            "rss_end_bytes": rss_end,
            "rss_growth_bytes": max(rss_touched, rss_end) - rss_base,
            "rss_budget_bytes": budget,
            "rss_within_budget": max(rss_touched, rss_end) <= rss_base + budget,
            "models_latency_ms_p50": out["models"]["latency_s"]["p50"] * 1000,
            "models_latency_ms_p99": out["models"]["latency_s"]["p99"] * 1000,
        }
    )
    return out


def main(argv: list[str] | None = None) -> int:
    full = lambda model: ScaleConfig(model=model)  # noqa: E731
    return sb.cli(__doc__, run, quick_config, full, "a smoke test: 100 adapters", argv)


if __name__ == "__main__":
    raise SystemExit(main())
