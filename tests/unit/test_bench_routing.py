"""bench/routing.py's picker replays the endpoint picker's scorers: exact scores on hand-made
snapshots, the metrics parser on a real ServerMetrics rendering, and the Zipf sequence."""

from __future__ import annotations

import random
from collections import Counter

import yaml

from bench.routing import (
    WEIGHTS,
    Snapshot,
    home_replica,
    lora_score,
    parse_metrics,
    pick,
    zipf_sequence,
)
from deploy.check import repo_root
from flora_server.engine.protocol import EngineStats
from flora_server.metrics import ServerMetrics


def test_weights_are_the_epp_config_weights() -> None:
    path = repo_root() / "deploy/k8s/components/inference-pool/epp-config.yaml"
    config = yaml.safe_load(path.read_text())
    weights = {p["pluginRef"]: p.get("weight") for p in config["schedulingProfiles"][0]["plugins"]}
    assert weights == {
        "lora-affinity-scorer": WEIGHTS["lora"],
        "queue-scorer": WEIGHTS["queue"],
        "running-requests-size-scorer": WEIGHTS["running"],
        "kv-cache-utilization-scorer": WEIGHTS["kv"],
        "max-score-picker": None,
    }


def test_lora_score_follows_the_upstream_scorer_and_residency_raises_it() -> None:
    full = Snapshot(max_lora=2, running_adapters=frozenset({"a", "b"}))
    assert lora_score(full, "a", residency=False) == 1.0
    assert lora_score(full, "c", residency=False) == 0.0
    waiting = Snapshot(max_lora=2, running_adapters=frozenset({"a"}), waiting_adapters={"c"})
    assert lora_score(waiting, "c", residency=False) == 0.6  # 1 + 1 adapters: at capacity
    roomy = Snapshot(max_lora=4, running_adapters=frozenset({"a"}))
    assert lora_score(roomy, "z", residency=False) == 0.8
    resident = Snapshot(max_lora=4, device=frozenset({"z"}), host=frozenset({"y"}))
    assert lora_score(resident, "z", residency=True) == 1.0
    assert lora_score(resident, "y", residency=True) == 0.9
    assert lora_score(resident, "z", residency=False) == 0.8


def test_pick_prefers_residency_unless_that_replica_is_the_most_loaded() -> None:
    rng = random.Random(0)
    idle = [Snapshot(max_lora=4) for _ in range(3)]
    idle[2] = Snapshot(max_lora=4, device=frozenset({"hot"}), running=2)
    # 4*1.0 + 0.5*1 + 0.5*0 + 1 = 5.5 beats 4*0.8 + 0.5 + 0.5 + 1 = 5.2: the holder wins
    assert {pick(idle, "hot", True, rng) for _ in range(20)} == {2}
    assert {pick(idle, "hot", False, rng) for _ in range(50)} == {0, 1}  # stock: least busy
    queued = [*idle[:2], Snapshot(max_lora=4, device=frozenset({"hot"}), queue=3)]
    assert {pick(queued, "hot", True, rng) for _ in range(20)} == {2}  # 5.5 > 5.2
    worst = [*idle[:2], Snapshot(max_lora=4, device=frozenset({"hot"}), queue=3, running=2)]
    assert {pick(worst, "hot", True, rng) for _ in range(50)} == {0, 1}  # 5.0 < 5.2


def test_an_adapter_loaded_nowhere_goes_home() -> None:
    rng = random.Random(0)
    idle = [Snapshot(max_lora=4) for _ in range(3)]
    for adapter in ("a", "b", "c", "d", "e"):
        home = home_replica(adapter, 3)
        assert {pick(idle, adapter, True, rng) for _ in range(10)} == {home}
        # a copy anywhere turns the home term off, and the holder wins
        other = (home + 1) % 3
        held = [Snapshot(max_lora=4, host=frozenset({adapter})) if i == other else s
                for i, s in enumerate(idle)]  # fmt: skip
        assert pick(held, adapter, True, rng) == other
    assert {home_replica(f"r{i:03d}", 3) for i in range(50)} == {0, 1, 2}
    assert home_replica("a", 3) == home_replica("a", 3)


def test_parse_metrics_reads_what_the_server_renders() -> None:
    metrics = ServerMetrics()
    stats = EngineStats(1, 2, ("a",), ("b",), 4, "batched", ("a", "c"), ("d",), 0.5)
    metrics.bind_engine_stats(lambda: stats, "m")
    metrics.on_cache_miss()
    metrics.on_cache_miss()
    metrics.on_cache_hit("host")
    snap = parse_metrics(metrics.render().decode())
    assert (snap.queue, snap.running, snap.kv, snap.max_lora) == (2, 1, 0.5, 4)
    assert snap.running_adapters == {"a"} and snap.waiting_adapters == {"b"}
    assert snap.device == {"a", "c"} and snap.host == {"d"}
    assert (snap.store_loads, snap.host_hits) == (2, 1)


def test_zipf_sequence_is_seeded_and_skewed() -> None:
    seq = zipf_sequence(50, 1.1, 5000, seed=3)
    assert seq == zipf_sequence(50, 1.1, 5000, seed=3) != zipf_sequence(50, 1.1, 5000, seed=4)
    counts = Counter(seq)
    # p_1 / p_2 = 2^1.1 = 2.14; p_1 = 1 / sum_i i^-1.1 = 0.2612 for 50 adapters
    assert abs(counts[0] / 5000 - 0.2612) < 0.02
    assert 1.8 < counts[0] / counts[1] < 2.5
    assert set(seq) <= set(range(50))
