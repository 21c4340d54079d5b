"""Routing simulation: adapter affinity versus round robin over real flora-serve replicas.

No cluster runs here, so the endpoint picker's decision is replayed by this client
(bench/routing_policy.py). Each policy gets its own set of ``replicas`` flora-serve
processes on 127.0.0.1 (engine v2), all sets sharing one adapter store (a directory);
``adapters`` random rank-``rank`` FLoRA adapters on all 7 llama projections are uploaded
once. A replica holds ``max_slots`` adapters on device slots and about
``host_cache_adapters`` in its host cache, fewer than ``adapters``, so an adapter that lands
on a replica without it is loaded from the store: a cold load. Each request names adapter i
with Zipf probability p_i = i^-s / sum_j j^-s and streams ``max_new_tokens`` greedy tokens
from ``POST /v1/completions``; TTFT is send -> first chunk with text. ``concurrency`` clients
send back to back (closed loop).

Phases, the same seeded adapter sequence for every policy:

- engine warm-up: each replica serves two requests of ``engine_warmup_new_tokens`` tokens
  one after the other (adapters 0 then 1): its first decode steps and its first merge and
  unmerge of an adapter cost much more than later ones (first use), and the 1-token
  warm-up below never decodes or merges, so without this they land in the first measured
  blocks;
- warm-up: every adapter once (`first_touch`), then ``warmup_requests`` Zipf requests,
  through each policy, of ``warmup_new_tokens`` each, not measured (the first loads of
  the working set, which no policy avoids);
- measured: blocks of ``block_requests``, run in pairs with the policy order alternating
  (A B, B A, A B, ...), so a change in the machine's load hits every policy alike; pairs
  continue until ``budget_s`` from the start would be passed (at least ``min_block_pairs``,
  at most ``max_block_pairs``). Each policy's TTFTs and cold loads are pooled over its blocks.

Policies: ``round_robin`` (request k of a block to replica k mod replicas), ``affinity``
(the picker's scorers plus flora's residency scorer, bench/routing_policy.py) and,
with ``--policies``, ``affinity_stock`` (the picker's scorers alone).

While a block runs, its replica set is scraped every ``scrape_interval_s`` (as Prometheus or
the picker would), whatever the policy, so the scrape load is the same. Cold loads are the
replicas' own count of loads from the store (`flora_adapter_cache_misses_total`);
host-cache promotions are reported apart. Each request carries an `X-Request-Id`; the
replicas write JSON logs, and each measured request is joined with its access line (cold
or warm, queue time, the server's TTFT) to break the tail down (bench/routing_report.py),
next to each replica's engine step times. Writes bench/results/routing_quick.json
(``--quick``) or routing.json.

``python -m bench.routing --quick`` (goal: under 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench import serverbench as sb
from bench.routing_policy import Snapshot, estimate_tokens, parse_metrics, pick, zipf_sequence
from bench.routing_report import access_lines, engine_steps, join_access, tail_breakdown
from bench.workload import PROJECTIONS

TTFT_QUANTILES = (0.50, 0.90, 0.99)  # the policies' TTFT summary
PROMPTS = (
    "The capital of France is",
    "Write one sentence about the sea.",
    "List three colours:",
    "Once upon a time",
)
POLICIES = ("round_robin", "affinity", "affinity_stock")


@dataclass
class RoutingConfig:
    model: str = sb.DEFAULT_MODEL
    replicas: int = 3
    adapters: int = 50
    zipf_s: float = 1.1
    rank: int = 16
    targets: tuple[str, ...] = PROJECTIONS
    warmup_requests: int = 240
    warmup_new_tokens: int = 1
    # More than the engine's default merge_after_steps (4): merge, then unmerge for the next.
    engine_warmup_new_tokens: int = 8
    block_requests: int = 40
    min_block_pairs: int = 2
    max_block_pairs: int = 30
    budget_s: float = 1500.0
    concurrency: int = 6
    max_new_tokens: int = 4
    max_slots: int = 8
    host_cache_adapters: int = 20
    engine: str = "v2"
    kv_cache_bytes: int = 64 * 1024 * 1024
    scrape_interval_s: float = 0.1
    policies: tuple[str, ...] = ("round_robin", "affinity")
    seed: int = 0
    threads_per_replica: int = 1
    notes: str = ""


def quick_config(model: str = sb.DEFAULT_MODEL) -> RoutingConfig:
    return RoutingConfig(model=model, max_block_pairs=25, budget_s=480.0)


def block_order(policies: Sequence[str], pair: int) -> list[str]:
    """The policies in order for block pair `pair`: as given, then reversed, alternating."""
    return list(policies) if pair % 2 == 0 else list(reversed(policies))


@dataclass
class PolicyState:
    """One policy's replica set and what its picker and the bench have seen so far."""

    name: str
    urls: list[str]
    rng: random.Random
    snaps: list[Snapshot]
    results: list[dict] = field(default_factory=list)  # measured requests
    requests: list[int] = field(default_factory=list)  # per replica, measured
    adapters: list[set[str]] = field(default_factory=list)  # per replica, measured
    wall_s: float = 0.0  # measured blocks
    warm: list[Snapshot] = field(default_factory=list)  # after the warm-up
    in_flight: list[int] = field(default_factory=list)  # requests per replica, now
    in_flight_tokens: list[int] = field(default_factory=list)  # their estimated tokens

    def __post_init__(self) -> None:
        self.requests = [0] * len(self.urls)
        self.in_flight = [0] * len(self.urls)
        self.in_flight_tokens = [0] * len(self.urls)
        self.adapters = [set() for _ in self.urls]


@contextlib.contextmanager
def replica_sets(cfg: RoutingConfig, workdir: Path) -> Iterator[list[list[sb.Server]]]:
    """One set of `cfg.replicas` flora-serve processes per policy, all sharing
    workdir/store, started together."""
    host_bytes = cfg.host_cache_adapters * adapter_bytes(workdir)
    threads = str(cfg.threads_per_replica)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "NUMBA_NUM_THREADS": threads}
    sets: list[list[sb.Server]] = []
    try:
        for policy in cfg.policies:
            servers = []
            for i in range(cfg.replicas):
                port = sb.free_port()
                log_path = workdir / f"{policy}-replica{i}.log"
                cmd = [
                    sys.executable, "-m", "flora_server.cli", "--model", cfg.model,
                    "--host", "127.0.0.1", "--port", str(port),
                    "--adapter-store", str(workdir / "store"), "--log-level", "info",
                    "--log-format", "json",
                    "--engine", cfg.engine, "--kv-cache-bytes", str(cfg.kv_cache_bytes),
                    "--max-slots", str(cfg.max_slots), "--host-cache-bytes", str(host_bytes),
                    "--max-new-tokens", str(max(16, cfg.max_new_tokens)),
                    "--default-max-new-tokens", str(cfg.max_new_tokens),
                ]  # fmt: skip
                with log_path.open("wb") as log:
                    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                servers.append(sb.Server(proc, f"http://127.0.0.1:{port}", log_path))
            sets.append(servers)
        deadline = time.monotonic() + 600
        for server in (s for servers in sets for s in servers):
            while True:
                if server.proc.poll() is not None:
                    raise RuntimeError(f"replica exited: {server.log_tail()}")
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not ready: {server.log_tail()}")
                time.sleep(0.5)
        yield sets
    finally:
        everyone = [s for servers in sets for s in servers]
        for server in everyone:
            if server.proc.poll() is None:
                server.proc.terminate()
        for server in everyone:
            try:
                server.proc.wait(30)
            except subprocess.TimeoutExpired:
                server.proc.kill()


def adapter_bytes(workdir: Path) -> int:
    """Size of one archive (all are the same shape)."""
    return next((workdir / "archives").glob("*.flora")).stat().st_size


def _client(cfg: RoutingConfig, replicas: int) -> httpx.AsyncClient:
    # Idle connections are dropped before the server's 5 s keep-alive timeout closes them,
    # so a request never goes out on a connection the server is closing.
    limits = httpx.Limits(max_connections=cfg.concurrency + 2 * replicas, keepalive_expiry=2.0)
    return httpx.AsyncClient(timeout=sb.HTTP_TIMEOUT, limits=limits)


async def _scrape(client: httpx.AsyncClient, urls: list[str]) -> list[Snapshot]:
    return [parse_metrics((await client.get(f"{u}/metrics")).text) for u in urls]


async def _scrape_loop(client: httpx.AsyncClient, state: PolicyState, interval: float) -> None:
    while True:
        for i, url in enumerate(state.urls):
            with contextlib.suppress(httpx.HTTPError):
                state.snaps[i] = parse_metrics((await client.get(f"{url}/metrics")).text)
        await asyncio.sleep(interval)


def request_body(adapter: str, prompt: str, n: int) -> bytes:
    """The completion request's JSON body, as sent (its size is what the picker's token
    estimate reads)."""
    body = {"model": adapter, "prompt": prompt, "max_tokens": n, "stream": True}
    return json.dumps(body, separators=(",", ":")).encode()


async def _one(client: httpx.AsyncClient, url: str, body: bytes, request_id: str) -> dict:
    headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
    start = time.monotonic()
    ttft = None
    try:
        async with client.stream(
            "POST", f"{url}/v1/completions", content=body, headers=headers
        ) as r:
            status = r.status_code
            async for line in r.aiter_lines():
                if ttft is None and line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and chunk["choices"][0].get("text"):
                        ttft = time.monotonic() - start
    except httpx.HTTPError as exc:
        return {"status": type(exc).__name__, "ttft": None, "sent": start}
    return {"status": status, "ttft": ttft, "total": time.monotonic() - start, "sent": start}


async def run_block(
    cfg: RoutingConfig,
    state: PolicyState,
    ids: list[str],
    sequence: list[int],
    block: int | None,
) -> None:
    """Send `sequence` (adapter indices; k counts from 0 in every block) through the
    policy; append the results to `state` unless `block` is None (the warm-up, whose
    requests generate ``warmup_new_tokens``)."""
    measured = block is not None
    tokens = cfg.max_new_tokens if measured else cfg.warmup_new_tokens
    order = iter(enumerate(sequence))
    async with _client(cfg, len(state.urls)) as client:
        state.snaps = await _scrape(client, state.urls)  # a fresh scrape before any decision
        scraper = asyncio.create_task(_scrape_loop(client, state, cfg.scrape_interval_s))

        async def worker() -> None:
            for k, index in order:
                adapter = ids[index]
                body = request_body(adapter, PROMPTS[k % len(PROMPTS)], tokens)
                if state.name == "round_robin":
                    replica = k % len(state.urls)
                else:
                    flora = state.name == "affinity"
                    replica = pick(state.snaps, adapter, flora, state.rng, state.in_flight_tokens)
                request_id = f"{state.name}-{'w' if block is None else block}-{k}"
                # The picker's in-flight accounting (inflight-load-producer): added when the
                # request is sent, removed when its response ends. Kept for every policy.
                in_flight, estimate = state.in_flight[replica], estimate_tokens(len(body))
                state.in_flight[replica] += 1
                state.in_flight_tokens[replica] += estimate
                try:
                    out = await _one(client, state.urls[replica], body, request_id)
                finally:
                    state.in_flight[replica] -= 1
                    state.in_flight_tokens[replica] -= estimate
                if measured:
                    state.requests[replica] += 1
                    state.adapters[replica].add(adapter)
                    record = {**out, "block": block, "replica": replica, "adapter": adapter,
                              "request_id": request_id, "in_flight": in_flight}  # fmt: skip
                    state.results.append(record)

        start = time.monotonic()
        try:
            await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
        finally:
            scraper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scraper
        if measured:
            state.wall_s += time.monotonic() - start


async def engine_warmup(cfg: RoutingConfig, urls: list[str], ids: list[str]) -> None:
    """Every replica at once: adapter 0's request, then adapter 1's (see the module doc)."""
    async with _client(cfg, len(urls)) as client:

        async def one_replica(i: int, url: str) -> None:
            for k, adapter in enumerate(ids[:2]):
                body = request_body(adapter, PROMPTS[k], cfg.engine_warmup_new_tokens)
                out = await _one(client, url, body, f"engine-warmup-{i}-{k}")
                if out["status"] != 200:
                    raise RuntimeError(f"engine warm-up on {url}: {out['status']}")

        await asyncio.gather(*(one_replica(i, u) for i, u in enumerate(urls)))


async def scrape_all(cfg: RoutingConfig, urls: list[str]) -> list[Snapshot]:
    async with _client(cfg, len(urls)) as client:
        return await _scrape(client, urls)


def run(cfg: RoutingConfig, workdir: Path, raw: Path | None = None) -> dict[str, Any]:
    """The whole bench in `workdir`; `raw` (optional) receives every measured request
    as a JSON line (policy, block, replica, adapter, status, ttft, total, sent: the
    monotonic clock at sending, request_id, in_flight, and the access line's cold, queue_s,
    server_ttft_s)."""
    started = time.monotonic()
    load_start = list(os.getloadavg())
    timing: dict[str, Any] = {}

    def mark(step: str) -> None:
        timing[f"{step}_s"] = round(time.monotonic() - started - sum(timing.values()), 1)
        print(f"{step}: {timing[f'{step}_s']} s", file=sys.stderr)

    paths = sb.make_adapters(
        cfg.model, workdir / "archives", cfg.adapters, rank=cfg.rank, targets=cfg.targets,
        seed=cfg.seed,
    )  # fmt: skip
    mark("make_adapters")
    ids = [f"r{i:03d}" for i in range(cfg.adapters)]
    total = cfg.warmup_requests + cfg.max_block_pairs * cfg.block_requests
    sequence = zipf_sequence(cfg.adapters, cfg.zipf_s, total, cfg.seed)
    warmup, measured = sequence[: cfg.warmup_requests], sequence[cfg.warmup_requests :]
    warmup = first_touch(cfg.adapters, cfg.seed) + warmup
    with replica_sets(cfg, workdir) as sets:
        mark("start_replicas")
        counts = asyncio.run(sb.upload_all(sets[0][0].url, ids, paths))
        if counts != {"201": cfg.adapters}:
            raise RuntimeError(f"uploads: {counts}")
        mark("upload")
        asyncio.run(engine_warmup(cfg, [s.url for servers in sets for s in servers], ids))
        mark("engine_warmup")
        states = {
            name: PolicyState(name, [s.url for s in servers], random.Random(cfg.seed + 1), [])
            for name, servers in zip(cfg.policies, sets, strict=True)
        }
        for state in states.values():
            asyncio.run(run_block(cfg, state, ids, warmup, None))
            state.warm = asyncio.run(scrape_all(cfg, state.urls))
        mark("warmup")
        pairs, pair_s = 0, 0.0
        while pairs < cfg.max_block_pairs:
            elapsed = time.monotonic() - started
            if pairs >= cfg.min_block_pairs and elapsed + pair_s > cfg.budget_s:
                break
            pair_start = time.monotonic()
            block = measured[pairs * cfg.block_requests : (pairs + 1) * cfg.block_requests]
            for name in block_order(cfg.policies, pairs):
                asyncio.run(run_block(cfg, states[name], ids, block, pairs))
            pair_s = time.monotonic() - pair_start
            pairs += 1
            print(f"block pair {pairs} done in {pair_s:.0f} s", file=sys.stderr)
        mark("measured")
        ends = {name: asyncio.run(scrape_all(cfg, state.urls)) for name, state in states.items()}
    lines = access_lines(s.log_path for servers in sets for s in servers)
    for state in states.values():
        join_access(state.results, lines)
    policies = {name: policy_result(state, ends[name]) for name, state in states.items()}
    for name, result in policies.items():
        print(f"{name}: {json.dumps(result)}", file=sys.stderr)
    if raw is not None:
        with raw.open("w") as f:
            for name, state in states.items():
                for record in state.results:
                    f.write(json.dumps({"policy": name, **record}) + "\n")
    machine = {
        "cpus": os.cpu_count(),
        "loadavg_at_start": load_start,
        "loadavg_at_end": list(os.getloadavg()),
    }
    timing["block_pairs"] = pairs
    return summarize(cfg, policies, time.monotonic() - started, machine, timing)


def first_touch(adapters: int, seed: int) -> list[int]:
    """Every adapter once, in a seeded order: the warm-up's first requests. A Zipf draw of
    a few hundred requests misses the rarest adapters (240 draws over 50 adapters at
    s = 1.1 leave 7 unseen), whose first request would then be a store load in the
    measured phase under any policy."""
    order = list(range(adapters))
    random.Random(seed).shuffle(order)
    return order


def policy_result(state: PolicyState, end: list[Snapshot]) -> dict[str, Any]:
    """A policy's measured-phase numbers: `state.warm` and `end` are its replicas' scrapes
    after the warm-up and at the end."""
    loads = [e.store_loads - w.store_loads for e, w in zip(end, state.warm, strict=True)]
    promotions = [e.host_hits - w.host_hits for e, w in zip(end, state.warm, strict=True)]
    load_s = sum(e.load_seconds - w.load_seconds for e, w in zip(end, state.warm, strict=True))
    n = len(state.results)
    ttfts = [r["ttft"] for r in state.results if r["ttft"] is not None]
    return {
        "requests": n,
        "ok": sum(1 for r in state.results if r["status"] == 200),
        "statuses": dict(Counter(str(r["status"]) for r in state.results)),
        "wall_s": round(state.wall_s, 2),
        "warmup_cold_loads": int(sum(w.store_loads for w in state.warm)),
        "cold_loads": int(sum(loads)),
        "cold_loads_per_1k": round(1000 * sum(loads) / max(n, 1), 1),
        "host_promotions_per_1k": round(1000 * sum(promotions) / max(n, 1), 1),
        "mean_cold_load_ms": round(1000 * load_s / sum(loads), 1) if sum(loads) else None,
        "ttft_s": sb.percentiles(ttfts, TTFT_QUANTILES),
        "per_replica": [
            {"requests": r, "distinct_adapters": len(a), "cold_loads": int(c)}
            for r, a, c in zip(state.requests, state.adapters, loads, strict=True)
        ],
        "engine": engine_steps(state.warm, end),
        "tail": tail_breakdown(state.results, len(state.urls)),
    }


def summarize(
    cfg: RoutingConfig,
    policies: dict[str, Any],
    seconds: float,
    machine: dict[str, Any],
    timing: dict[str, Any],
) -> dict[str, Any]:
    """The result file: config, per-policy numbers, and the issue's two ratios with their
    goals (affinity cold loads <= 0.5x round robin's; TTFT p99 ratio <= 0.8)."""
    out: dict[str, Any] = {"config": asdict(cfg), "policies": policies}
    rr, aff = policies.get("round_robin"), policies.get("affinity")
    if rr and aff:
        rr_loads, aff_loads = rr["cold_loads_per_1k"], aff["cold_loads_per_1k"]
        out["cold_loads_per_1k_round_robin"] = rr_loads
        out["cold_loads_per_1k_affinity"] = aff_loads
        out["cold_loads_affinity_ratio"] = round(aff_loads / rr_loads, 3) if rr_loads else None
        for name, p in (("round_robin", rr), ("affinity", aff)):
            out[f"ttft_p50_s_{name}"] = p["ttft_s"]["p50"]
            out[f"ttft_p99_s_{name}"] = p["ttft_s"]["p99"]
        rr_p99, aff_p99 = rr["ttft_s"]["p99"], aff["ttft_s"]["p99"]
        ratio = round(aff_p99 / rr_p99, 3) if rr_p99 and aff_p99 is not None else None
        out["ttft_p99_affinity_ratio"] = ratio
        out["goals"] = {
            "cold_loads_affinity_le_half_round_robin": aff_loads <= 0.5 * rr_loads,
            "ttft_p99_ratio_le_0.8": ratio is not None and ratio <= 0.8,
        }
    out["machine"] = machine
    out["timing"] = timing
    out["wall_s"] = round(seconds, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="no block pair starts after 8 minutes (budget 480 s)"
    )
    parser.add_argument("--model", default=sb.DEFAULT_MODEL)
    parser.add_argument("--budget-s", type=float, help="stop starting block pairs after this")
    parser.add_argument("--policies", help=f"comma-separated, of: {', '.join(POLICIES)}")
    parser.add_argument("--notes", default="", help="recorded in the result (e.g. the load)")
    parser.add_argument("--out", type=Path, help="result file (default bench/results/...)")
    parser.add_argument("--raw", type=Path, help="also write every measured request (JSON lines)")
    args = parser.parse_args(argv)
    cfg = quick_config(args.model) if args.quick else RoutingConfig(model=args.model)
    if args.budget_s:
        cfg.budget_s = args.budget_s
    if args.policies:
        cfg.policies = tuple(p.strip() for p in args.policies.split(","))
        unknown = set(cfg.policies) - set(POLICIES)
        if unknown or len(cfg.policies) < 2:
            parser.error(f"--policies: two or more of {', '.join(POLICIES)}")
    cfg.notes = args.notes
    results = Path(__file__).resolve().parent / "results"
    out = args.out or results / ("routing_quick.json" if args.quick else "routing.json")
    with sb.scratch_dir("flora-routing-") as tmp:
        result = run(cfg, Path(tmp), args.raw)
    out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "policies"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["TTFT_QUANTILES", "RoutingConfig", "block_order", "run", "summarize"]
