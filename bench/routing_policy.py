"""The endpoint picker's decision, replayed by bench/routing.py: parse a replica's /metrics
into what the picker knows, score the replicas as the scorers of
deploy/k8s/components/inference-pool/epp-config.yaml do, pick the best; and the Zipf
adapter sequence the bench sends.

Scores (the EPP configuration's scorers and weights: LoRA affinity 4, queue 0.5, running
0.5, KV cache 1, token load 4; highest total wins, ties at random):

- queue: (max q - q) / (max q - min q) over the replicas, 1 for all when they are equal
  (the upstream queue-scorer); running: the same over the running batches
  (running-requests-size-scorer); KV: 1 - usage (kv-cache-utilization-scorer);
- LoRA (the upstream lora-affinity-scorer, v1.5.0): 1.0 when the adapter runs there
  (`vllm:lora_requests_info` running_lora_adapters), 0.8 when running + waiting adapters
  are fewer than max_lora, 0.6 when it waits there, else 0;
- token load (the upstream token-load-scorer fed by the inflight-load-producer, v1.5.0):
  1 - min(tokens, T) / T, where tokens is the picker's own estimate of the work it has sent
  to the replica and not yet seen finish (`estimate_tokens` of each request body, added when
  the request is sent, removed at the end of its response) and T = `queueThresholdTokens`.
  Unlike the scraped queue and running gauges it is never stale and it is absolute, not
  normalised over the replicas.

With ``flora=True`` (the bench's ``affinity`` policy) one more scorer, what a custom EPP
scorer plugin reading flora's residency gauge would add, weight ``WEIGHTS["residency"]``:
1.0 where `flora_lora_adapter_loaded` shows the adapter on a device slot, 0.8 where it is
in the host cache, 0 elsewhere; for an adapter no replica holds, 1.0 at its "home", the
replica a rendezvous hash of (adapter, replica) ranks first (the stateless consistent-hash
idea of docs/deploy.md, as a score so that load can still override it). The upstream
LoRA scorer alone cannot keep an adapter in place: it scores a replica where the adapter
runs 1.0 and any replica with a free slot 0.8 (0.8 points apart at weight 4, less than
one request's difference in the queue and running gauges), and one where it is loaded but
idle as any other, so each adapter drifts over every replica and is loaded on each. With
the residency scorer a holder leads a replica without the adapter by 2.0 points (device
slot; 2.8 while the adapter runs there) or 1.6 (host cache), and loses the request only
when the load terms differ by more: with equal gauges, about 10 (device) or 8 (host) more
requests of the bench's size in flight (about 50 estimated tokens, 0.2 points each); with
the queue and running gauges at their worst (1 point), 5 or 3. docs/deploy.md has the
measurements.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

# As in epp-config.yaml (scorer weights, and the token-load-scorer's queueThresholdTokens),
# plus flora's residency scorer (a custom plugin; not in the shipped configuration).
WEIGHTS = {
    "lora": 4.0,
    "queue": 0.5,
    "running": 0.5,
    "kv": 1.0,
    "token_load": 4.0,
    "residency": 2.0,
}
TOKEN_LOAD_THRESHOLD = 1024
HOST_RESIDENCY = 0.8  # the residency score of an adapter in the host cache


@dataclass
class Snapshot:
    """What the picker knows about one replica from its last scrape, and the replica's
    cache counters (read by the bench, not by the picker)."""

    queue: float = 0.0
    running: float = 0.0
    kv: float = 0.0
    max_lora: int = 0
    running_adapters: frozenset[str] = frozenset()
    waiting_adapters: frozenset[str] = frozenset()
    device: frozenset[str] = frozenset()
    host: frozenset[str] = frozenset()
    store_loads: float = 0.0  # flora_adapter_cache_misses_total
    host_hits: float = 0.0  # flora_adapter_cache_hits_total{tier="host"}
    load_seconds: float = 0.0  # flora_adapter_load_seconds_sum{result="ok"}
    steps: float = 0.0  # flora_engine_step_seconds_count, all modes
    step_seconds: float = 0.0  # flora_engine_step_seconds_sum
    slow_steps: float = 0.0  # steps over 0.32 s (the histogram's bucket bound)
    stuck_steps: float = 0.0  # steps over 2.56 s (its last finite bound)
    merge_switches: float = 0.0  # flora_engine_merge_switches_total


# The samples the picker and the bench read. Only their lines are parsed: a replica's page
# is mostly latency histograms, and parsing all of it ten times a second per replica would
# take CPU from the replicas under test.
_READ = (
    "flora_queue_length",
    "flora_running_batch_size",
    "flora_kv_cache_usage_perc",
    "vllm:lora_requests_info",
    "flora_lora_adapter_loaded",
    "flora_adapter_cache_misses_total",
    "flora_adapter_cache_hits_total",
    "flora_adapter_load_seconds_sum",
    "flora_engine_step_seconds_count",
    "flora_engine_step_seconds_sum",
    "flora_engine_step_seconds_bucket",
    "flora_engine_merge_switches_total",
)
SLOW_STEP_S, STUCK_STEP_S = "0.32", "2.56"


def _wanted(line: str) -> bool:
    name = line.split("{", 1)[0].split(" ", 1)[0]
    return name in _READ


def parse_metrics(text: str) -> Snapshot:
    """What the picker reads from a Prometheus text page (other samples are skipped)."""
    snap = Snapshot()
    device, host = set(), set()
    kept = "\n".join(line for line in text.splitlines() if _wanted(line))
    for family in text_string_to_metric_families(kept + "\n"):
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
            elif name == "flora_adapter_load_seconds_sum" and labels.get("result") == "ok":
                snap.load_seconds = value
            elif name == "flora_engine_step_seconds_count":
                snap.steps += value
                snap.slow_steps += value
                snap.stuck_steps += value
            elif name == "flora_engine_step_seconds_sum":
                snap.step_seconds += value
            elif name == "flora_engine_step_seconds_bucket" and labels.get("le") == SLOW_STEP_S:
                snap.slow_steps -= value
            elif name == "flora_engine_step_seconds_bucket" and labels.get("le") == STUCK_STEP_S:
                snap.stuck_steps -= value
            elif name == "flora_engine_merge_switches_total":
                snap.merge_switches = value
    snap.device, snap.host = frozenset(device), frozenset(host)
    return snap


def _split(value: str | None) -> list[str]:
    return [v for v in (value or "").split(",") if v]


def lora_score(snap: Snapshot, adapter: str) -> float:
    """The upstream lora-affinity-scorer."""
    if adapter in snap.running_adapters:
        return 1.0
    if len(snap.running_adapters) + len(snap.waiting_adapters) < snap.max_lora:
        return 0.8
    if adapter in snap.waiting_adapters:
        return 0.6
    return 0.0


def residency_score(snap: Snapshot, adapter: str, home: bool) -> float:
    """flora's residency scorer: where the adapter is loaded, or, for an adapter that no
    replica holds (the caller knows), whether this replica is its home."""
    if adapter in snap.device:
        return 1.0
    if adapter in snap.host:
        return HOST_RESIDENCY
    return 1.0 if home else 0.0


def home_replica(adapter: str, replicas: int) -> int:
    """Rendezvous hashing: the replica with the highest hash of (adapter, replica)."""
    return max(
        range(replicas),
        key=lambda i: hashlib.blake2b(f"{adapter}/{i}".encode(), digest_size=8).digest(),
    )


def estimate_tokens(body_bytes: int) -> int:
    """The inflight-load-producer's estimate of a request (SimpleTokenEstimator with the
    request's size): input = max(bytes // 4, 1), output = round(1.5 input) (Go's
    math.Round, half away from zero); 0 for an empty body."""
    if body_bytes <= 0:
        return 0
    inputs = max(body_bytes // 4, 1)
    return inputs + math.floor(inputs * 1.5 + 0.5)


def token_load_score(tokens: float, threshold: float = TOKEN_LOAD_THRESHOLD) -> float:
    """The upstream token-load-scorer: 1 - min(tokens, threshold) / threshold."""
    return 1.0 - min(max(tokens, 0.0), threshold) / threshold


def scores(
    snaps: list[Snapshot],
    adapter: str,
    flora: bool,
    in_flight_tokens: Sequence[float] | None = None,
) -> list[float]:
    """Each replica's weighted total. `flora` adds the residency scorer (module doc);
    `in_flight_tokens` is the picker's estimate of each replica's in-flight work (None:
    nothing in flight)."""
    tokens = in_flight_tokens if in_flight_tokens is not None else [0.0] * len(snaps)
    queue = spread_scores([s.queue for s in snaps])
    running = spread_scores([s.running for s in snaps])
    totals = [
        WEIGHTS["lora"] * lora_score(s, adapter)
        + WEIGHTS["queue"] * queue[i]
        + WEIGHTS["running"] * running[i]
        + WEIGHTS["kv"] * (1.0 - s.kv)
        + WEIGHTS["token_load"] * token_load_score(tokens[i])
        for i, s in enumerate(snaps)
    ]
    if flora:
        held = any(adapter in s.device | s.host | s.running_adapters for s in snaps)
        home = -1 if held else home_replica(adapter, len(snaps))
        for i, s in enumerate(snaps):
            totals[i] += WEIGHTS["residency"] * residency_score(s, adapter, i == home)
    return totals


def pick(
    snaps: list[Snapshot],
    adapter: str,
    flora: bool,
    rng: random.Random,
    in_flight_tokens: Sequence[float] | None = None,
) -> int:
    """The replica with the highest score (ties at random, as the max-score-picker)."""
    totals = scores(snaps, adapter, flora, in_flight_tokens)
    best = max(totals)
    return rng.choice([i for i, v in enumerate(totals) if v >= best - 1e-9])


def spread_scores(values: list[float]) -> list[float]:
    """(max - v) / (max - min) for each value, 1 for all when they are equal (the upstream
    queue-scorer and running-requests-size-scorer)."""
    low, high = min(values), max(values)
    return [1.0 if high == low else (high - v) / (high - low) for v in values]


def zipf_sequence(n_adapters: int, s: float, n: int, seed: int) -> list[int]:
    """`n` adapter indices (0-based) drawn with p_i proportional to (i + 1)^-s."""
    weights = [(i + 1) ** -s for i in range(n_adapters)]
    return random.Random(seed).choices(range(n_adapters), weights=weights, k=n)


__all__ = [
    "HOST_RESIDENCY",
    "TOKEN_LOAD_THRESHOLD",
    "WEIGHTS",
    "Snapshot",
    "estimate_tokens",
    "home_replica",
    "lora_score",
    "parse_metrics",
    "pick",
    "residency_score",
    "scores",
    "spread_scores",
    "token_load_score",
    "zipf_sequence",
]
