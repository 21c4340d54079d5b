"""Routing simulation: adapter affinity versus round robin over 3 real flora-serve replicas.

No cluster runs here, so the endpoint picker's decision is replayed by this client. Three
`flora-serve` processes on 127.0.0.1 share one adapter store (a directory) and have small
caches (``max_slots`` device slots, a host cache of about ``host_cache_adapters`` adapters),
so an adapter that lands on a replica that does not hold it is loaded from the store: a
cold load. ``adapters`` random rank-8 FLoRA adapters are uploaded once; each request names
adapter i with Zipf probability p_i = i^-s / sum_j j^-s, streams ``max_new_tokens`` greedy
tokens from ``POST /v1/completions``, and TTFT is send -> first chunk with text.
``concurrency`` clients send back to back (closed loop); the same seeded adapter sequence is
replayed for every policy, and each policy starts from freshly started (cold) replicas.

Policies:

- ``round_robin``: request k goes to replica k mod 3;
- ``affinity``: scores every replica from its latest /metrics scrape the way the endpoint
  picker's scorers in deploy/k8s/components/inference-pool/epp-config.yaml do, same weights
  (LoRA affinity 4, queue 0.5, running 0.5, KV-cache 1), highest score wins, ties at random:
  queue score (max q - q) / (max q - min q) over the replicas (1 when all equal), running
  likewise over the running batches; KV score 1 - usage; LoRA score 1.0 when the adapter
  runs there (`vllm:lora_requests_info` running_lora_adapters), 0.8 when running + waiting
  adapters are fewer than max_lora, 0.6 when it is waiting there, else 0 (the upstream
  lora-affinity-scorer, v1.5.0) - raised to 1.0 when
  `flora_lora_adapter_loaded` shows it on a device slot and 0.9 in the host cache, the
  residency signal flora adds so idle-but-loaded adapters still attract their traffic -
  and, for an adapter no replica holds, a "home" term (weight 0.6) for the replica a
  rendezvous hash of (adapter, replica) ranks first, so it goes back to the same replica
  instead of a random one (the stateless consistent-hash idea in docs/deploy.md, as a
  score so that load can still override it). ``affinity_stock`` (optional) is the
  upstream scorers alone.

Every policy scrapes every replica each ``scrape_interval_s`` (as Prometheus or the picker
would), so the scrape load is the same for all. Cold loads are the replicas' own count of
loads from the store (`flora_adapter_cache_misses_total`); host-cache promotions are
reported apart. Writes bench/results/routing_quick.json (``--quick``) or routing.json.

``python -m bench.routing --quick`` (goal: under 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench import serverbench as sb

WEIGHTS = {"lora": 4.0, "queue": 0.5, "running": 0.5, "kv": 1.0}  # as in epp-config.yaml
HOME_WEIGHT = 0.6  # flora's extension, for an adapter no replica holds
PROMPTS = (
    "The capital of France is",
    "Write one sentence about the sea.",
    "List three colours:",
    "Once upon a time",
)


@dataclass
class RoutingConfig:
    model: str = sb.DEFAULT_MODEL
    replicas: int = 3
    adapters: int = 50
    zipf_s: float = 1.1
    requests: int = 600
    concurrency: int = 6
    max_new_tokens: int = 4
    max_slots: int = 4
    host_cache_adapters: int = 4
    scrape_interval_s: float = 0.1
    policies: tuple[str, ...] = ("round_robin", "affinity")
    seed: int = 0
    threads_per_replica: int = 1


def quick_config(model: str = sb.DEFAULT_MODEL) -> RoutingConfig:
    return RoutingConfig(model=model, requests=240)


def zipf_sequence(n_adapters: int, s: float, n: int, seed: int) -> list[int]:
    """`n` adapter indices (0-based) drawn with p_i proportional to (i + 1)^-s."""
    weights = [(i + 1) ** -s for i in range(n_adapters)]
    return random.Random(seed).choices(range(n_adapters), weights=weights, k=n)


@dataclass
class Snapshot:
    """What the picker knows about one replica from its last scrape."""

    queue: float = 0.0
    running: float = 0.0
    kv: float = 0.0
    max_lora: int = 0
    running_adapters: frozenset[str] = frozenset()
    waiting_adapters: frozenset[str] = frozenset()
    device: frozenset[str] = frozenset()
    host: frozenset[str] = frozenset()
    store_loads: float = 0.0
    host_hits: float = 0.0


def parse_metrics(text: str) -> Snapshot:
    snap = Snapshot()
    device, host = set(), set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "flora_queue_length":
                snap.queue = value
            elif name == "flora_running_batch_size":
                snap.running = value
            elif name == "flora_kv_cache_usage_perc":
                snap.kv = value
            elif name == "vllm:lora_requests_info":
                snap.max_lora = int(labels.get("max_lora", "0") or 0)
                snap.running_adapters = frozenset(_split(labels.get("running_lora_adapters")))
                snap.waiting_adapters = frozenset(_split(labels.get("waiting_lora_adapters")))
            elif name == "flora_lora_adapter_loaded" and value > 0:
                (device if labels.get("tier") == "device" else host).add(labels["adapter"])
            elif name == "flora_adapter_cache_misses_total":
                snap.store_loads = value
            elif name == "flora_adapter_cache_hits_total" and labels.get("tier") == "host":
                snap.host_hits = value
    snap.device, snap.host = frozenset(device), frozenset(host)
    return snap


def _split(value: str | None) -> list[str]:
    return [v for v in (value or "").split(",") if v]


def lora_score(snap: Snapshot, adapter: str, residency: bool) -> float:
    """The upstream lora-affinity-scorer, optionally raised by flora's residency gauge."""
    if adapter in snap.running_adapters:
        score = 1.0
    elif len(snap.running_adapters) + len(snap.waiting_adapters) < snap.max_lora:
        score = 0.8
    elif adapter in snap.waiting_adapters:
        score = 0.6
    else:
        score = 0.0
    if residency:
        if adapter in snap.device:
            score = max(score, 1.0)
        elif adapter in snap.host:
            score = max(score, 0.9)
    return score


def home_replica(adapter: str, replicas: int) -> int:
    """Rendezvous hashing: the replica with the highest hash of (adapter, replica)."""
    return max(
        range(replicas),
        key=lambda i: hashlib.blake2b(f"{adapter}/{i}".encode(), digest_size=8).digest(),
    )


def pick(snaps: list[Snapshot], adapter: str, residency: bool, rng: random.Random) -> int:
    """The replica with the highest weighted score (ties at random). `residency` adds
    flora's signals: the residency gauge and the adapter's home replica."""
    queue = _spread_scores([s.queue for s in snaps])
    running = _spread_scores([s.running for s in snaps])
    loaded = any(adapter in s.device | s.host | s.running_adapters for s in snaps)
    home = home_replica(adapter, len(snaps)) if residency and not loaded else -1
    scores = []
    for i, s in enumerate(snaps):
        total = (
            WEIGHTS["lora"] * lora_score(s, adapter, residency)
            + WEIGHTS["queue"] * queue[i]
            + WEIGHTS["running"] * running[i]
            + WEIGHTS["kv"] * (1.0 - s.kv)
            + (HOME_WEIGHT if i == home else 0.0)
        )
        scores.append(total)
    best = max(scores)
    return rng.choice([i for i, v in enumerate(scores) if v >= best - 1e-9])


def _spread_scores(values: list[float]) -> list[float]:
    """(max - v) / (max - min) for each value, 1 for all when they are equal (the upstream
    queue-scorer and running-requests-size-scorer)."""
    low, high = min(values), max(values)
    return [1.0 if high == low else (high - v) / (high - low) for v in values]


@contextlib.contextmanager
def replicas(cfg: RoutingConfig, workdir: Path, tag: str) -> Iterator[list[sb.Server]]:
    """`cfg.replicas` flora-serve processes sharing workdir/store, started together."""
    host_bytes = cfg.host_cache_adapters * adapter_bytes(workdir)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(cfg.threads_per_replica),
        "NUMBA_NUM_THREADS": str(cfg.threads_per_replica),
    }
    servers = []
    try:
        for i in range(cfg.replicas):
            port = sb.free_port()
            log_path = workdir / f"{tag}-replica{i}.log"
            cmd = [
                sys.executable, "-m", "flora_server.cli", "--model", cfg.model,
                "--host", "127.0.0.1", "--port", str(port),
                "--adapter-store", str(workdir / "store"), "--log-level", "warning",
                "--max-slots", str(cfg.max_slots), "--host-cache-bytes", str(host_bytes),
                "--max-new-tokens", str(max(16, cfg.max_new_tokens)),
                "--default-max-new-tokens", str(cfg.max_new_tokens),
            ]  # fmt: skip
            with log_path.open("wb") as log:
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            servers.append(sb.Server(proc, f"http://127.0.0.1:{port}", log_path))
        deadline = time.monotonic() + 600
        for server in servers:
            while True:
                if server.proc.poll() is not None:
                    raise RuntimeError(f"replica exited: {server.log_tail()}")
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not ready: {server.log_tail()}")
                time.sleep(0.5)
        yield servers
    finally:
        for server in servers:
            if server.proc.poll() is None:
                server.proc.terminate()
        for server in servers:
            try:
                server.proc.wait(30)
            except subprocess.TimeoutExpired:
                server.proc.kill()


def adapter_bytes(workdir: Path) -> int:
    """Size of one archive (all are the same shape)."""
    return next((workdir / "archives").glob("*.flora")).stat().st_size


async def _scrape_loop(
    client: httpx.AsyncClient, urls: list[str], snaps: list[Snapshot], interval: float
) -> None:
    while True:
        for i, url in enumerate(urls):
            with contextlib.suppress(httpx.HTTPError):
                snaps[i] = parse_metrics((await client.get(f"{url}/metrics")).text)
        await asyncio.sleep(interval)


async def _one(client: httpx.AsyncClient, url: str, adapter: str, prompt: str, n: int) -> dict:
    body = {"model": adapter, "prompt": prompt, "max_tokens": n, "stream": True}
    start = time.monotonic()
    ttft = None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            status = r.status_code
            async for line in r.aiter_lines():
                if ttft is None and line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and chunk["choices"][0].get("text"):
                        ttft = time.monotonic() - start
    except httpx.HTTPError as exc:
        return {"status": type(exc).__name__, "ttft": None}
    return {"status": status, "ttft": ttft, "total": time.monotonic() - start}


async def drive(
    cfg: RoutingConfig, urls: list[str], ids: list[str], sequence: list[int], policy: str
) -> dict[str, Any]:
    """Send the sequence through `policy`; per-request results and per-replica counts."""
    rng = random.Random(cfg.seed + 1)
    snaps = [Snapshot() for _ in urls]
    results: list[dict] = []
    per_replica: list[dict[str, Any]] = [{"requests": 0, "adapters": set()} for _ in urls]
    order = iter(enumerate(sequence))
    limits = httpx.Limits(max_connections=cfg.concurrency + 2 * len(urls))
    async with httpx.AsyncClient(timeout=sb.HTTP_TIMEOUT, limits=limits) as client:
        for i, url in enumerate(urls):  # a first scrape before any decision
            snaps[i] = parse_metrics((await client.get(f"{url}/metrics")).text)
        before = [(s.store_loads, s.host_hits) for s in snaps]
        scraper = asyncio.create_task(_scrape_loop(client, urls, snaps, cfg.scrape_interval_s))

        async def worker() -> None:
            for k, index in order:
                adapter = ids[index]
                if policy == "round_robin":
                    replica = k % len(urls)
                else:
                    replica = pick(snaps, adapter, policy == "affinity", rng)
                per_replica[replica]["requests"] += 1
                per_replica[replica]["adapters"].add(adapter)
                prompt = PROMPTS[k % len(PROMPTS)]
                out = await _one(client, urls[replica], adapter, prompt, cfg.max_new_tokens)
                results.append({**out, "replica": replica, "adapter": adapter})

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
        wall = time.monotonic() - start
        scraper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await scraper
        after = [parse_metrics((await client.get(f"{u}/metrics")).text) for u in urls]
    loads = [a.store_loads - b[0] for a, b in zip(after, before, strict=True)]
    promotions = [a.host_hits - b[1] for a, b in zip(after, before, strict=True)]
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    n = len(results)
    return {
        "requests": n,
        "ok": sum(1 for r in results if r["status"] == 200),
        "statuses": _count(str(r["status"]) for r in results),
        "wall_s": round(wall, 2),
        "cold_loads": int(sum(loads)),
        "cold_loads_per_1k": round(1000 * sum(loads) / max(n, 1), 1),
        "host_promotions_per_1k": round(1000 * sum(promotions) / max(n, 1), 1),
        "ttft_s": sb.percentiles(ttfts),
        "per_replica": [
            {
                "requests": rep["requests"],
                "distinct_adapters": len(rep["adapters"]),
                "cold_loads": int(loads[i]),
            }
            for i, rep in enumerate(per_replica)
        ],
    }


def _count(values: Iterator[str] | Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def run(cfg: RoutingConfig, workdir: Path) -> dict[str, Any]:
    started = time.monotonic()
    paths = sb.make_adapters(cfg.model, workdir / "archives", cfg.adapters, seed=cfg.seed)
    ids = [f"r{i:03d}" for i in range(cfg.adapters)]
    sequence = zipf_sequence(cfg.adapters, cfg.zipf_s, cfg.requests, cfg.seed)
    policies: dict[str, Any] = {}
    uploaded = False
    for policy in cfg.policies:
        with replicas(cfg, workdir, policy) as servers:
            if not uploaded:
                counts = asyncio.run(sb.upload_all(servers[0].url, ids, paths))
                if counts != {"201": cfg.adapters}:
                    raise RuntimeError(f"uploads: {counts}")
                uploaded = True
            urls = [s.url for s in servers]
            policies[policy] = asyncio.run(drive(cfg, urls, ids, sequence, policy))
        print(f"{policy}: {json.dumps(policies[policy])}", file=sys.stderr)
    return summarize(cfg, policies, time.monotonic() - started)


def summarize(cfg: RoutingConfig, policies: dict[str, Any], seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {"config": asdict(cfg), "policies": policies}
    rr, aff = policies.get("round_robin"), policies.get("affinity")
    if rr and aff:
        out["cold_loads_per_1k_round_robin"] = rr["cold_loads_per_1k"]
        out["cold_loads_per_1k_affinity"] = aff["cold_loads_per_1k"]
        rr_p99, aff_p99 = rr["ttft_s"]["p99"], aff["ttft_s"]["p99"]
        out["ttft_p99_affinity_ratio"] = round(aff_p99 / rr_p99, 3) if rr_p99 else None
        for name, p in (("round_robin", rr), ("affinity", aff)):
            out[f"ttft_p50_s_{name}"] = p["ttft_s"]["p50"]
            out[f"ttft_p99_s_{name}"] = p["ttft_s"]["p99"]
        out["goals"] = {
            "cold_loads_affinity_le_half_round_robin": aff["cold_loads_per_1k"]
            <= 0.5 * rr["cold_loads_per_1k"],
            "ttft_p99_ratio_le_0.8": out["ttft_p99_affinity_ratio"] is not None
            and out["ttft_p99_affinity_ratio"] <= 0.8,
        }
    out["machine"] = {"cpus": os.cpu_count(), "loadavg_at_end": list(os.getloadavg())}
    out["wall_s"] = round(seconds, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="240 requests per policy")
    parser.add_argument("--model", default=sb.DEFAULT_MODEL)
    parser.add_argument("--requests", type=int, help="override the request count")
    parser.add_argument("--policies", help="comma-separated: round_robin, affinity, affinity_stock")
    parser.add_argument("--out", type=Path, help="result file (default bench/results/...)")
    args = parser.parse_args(argv)
    cfg = quick_config(args.model) if args.quick else RoutingConfig(model=args.model)
    if args.requests:
        cfg.requests = args.requests
    if args.policies:
        cfg.policies = tuple(p.strip() for p in args.policies.split(","))
    results = Path(__file__).resolve().parent / "results"
    out = args.out or results / ("routing_quick.json" if args.quick else "routing.json")
    with sb.scratch_dir("flora-routing-") as tmp:
        result = run(cfg, Path(tmp))
    out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "policies"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["RoutingConfig", "lora_score", "parse_metrics", "pick", "run"]
