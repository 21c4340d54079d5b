"""bench/routing_policy.py replays the endpoint picker's scorers: exact scores on hand-made
snapshots, the metrics parser on a real ServerMetrics rendering, and the Zipf sequence;
bench/routing.py's block order and summary maths on hand-made numbers."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import yaml

from bench.routing import (
    TTFT_QUANTILES,
    PolicyState,
    RoutingConfig,
    block_order,
    first_touch,
    policy_result,
    summarize,
)
from bench.routing_policy import (
    TOKEN_LOAD_THRESHOLD,
    WEIGHTS,
    Snapshot,
    estimate_tokens,
    home_replica,
    lora_score,
    parse_metrics,
    pick,
    residency_score,
    scores,
    spread_scores,
    token_load_score,
    zipf_sequence,
)
from bench.serverbench import nearest_rank, percentiles
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
        "token-load-scorer": WEIGHTS["token_load"],
        "max-score-picker": None,
    }
    assert set(WEIGHTS) - {"lora", "queue", "running", "kv", "token_load"} == {"residency"}
    by_type = {p["type"]: p for p in config["plugins"]}
    assert by_type["token-load-scorer"]["parameters"] == {
        "queueThresholdTokens": TOKEN_LOAD_THRESHOLD
    }
    assert "inflight-load-producer" in by_type  # what feeds the token-load scorer


def test_lora_score_is_the_upstream_scorer() -> None:
    full = Snapshot(max_lora=2, running_adapters=frozenset({"a", "b"}))
    assert lora_score(full, "a") == 1.0
    assert lora_score(full, "c") == 0.0
    waiting = Snapshot(
        max_lora=2, running_adapters=frozenset({"a"}), waiting_adapters=frozenset({"c"})
    )
    assert lora_score(waiting, "c") == 0.6  # 1 + 1 adapters: at capacity
    roomy = Snapshot(max_lora=4, running_adapters=frozenset({"a"}))
    assert lora_score(roomy, "z") == 0.8
    # loaded but idle: the upstream scorer does not see it
    resident = Snapshot(max_lora=4, device=frozenset({"z"}), host=frozenset({"y"}))
    assert lora_score(resident, "z") == lora_score(resident, "y") == 0.8


def test_residency_score_reads_the_gauge_then_the_home() -> None:
    resident = Snapshot(max_lora=4, device=frozenset({"z"}), host=frozenset({"y"}))
    assert residency_score(resident, "z", home=False) == 1.0
    assert residency_score(resident, "y", home=False) == 0.8
    assert residency_score(resident, "x", home=True) == 1.0
    assert residency_score(resident, "x", home=False) == 0.0


def test_spread_scores_normalise_over_the_replicas() -> None:
    assert spread_scores([0.0, 2.0, 4.0]) == [1.0, 0.5, 0.0]
    assert spread_scores([3.0, 3.0, 3.0]) == [1.0, 1.0, 1.0]
    assert spread_scores([5.0, 1.0]) == [0.0, 1.0]


def test_scores_are_the_weighted_sums() -> None:
    snaps = [
        Snapshot(max_lora=4, queue=2, running=1, kv=0.25, device=frozenset({"a"})),
        Snapshot(max_lora=4, queue=0, running=3, kv=0.5),
        Snapshot(max_lora=1, queue=1, running=1, kv=0.0, running_adapters=frozenset({"b"})),
    ]
    # queue scores 0, 1, 0.5; running 1, 0, 1; LoRA (stock) 0.8, 0.8, 0 (slots full);
    # token load 1 everywhere (nothing in flight): + 4
    assert scores(snaps, "a", False) == pytest.approx(
        [4 * 0.8 + 0 + 0.5 + 0.75 + 4, 4 * 0.8 + 0.5 + 0 + 0.5 + 4, 0 + 0.25 + 0.5 + 1.0 + 4]
    )
    # flora: + 2 x residency, "a" on a device slot of replica 0 (no home term: it is held)
    assert scores(snaps, "a", True) == pytest.approx(
        [4 * 0.8 + 0 + 0.5 + 0.75 + 4 + 2, 4 * 0.8 + 0.5 + 0 + 0.5 + 4, 0 + 0.25 + 0.5 + 1.0 + 4]
    )
    # in-flight tokens 256, 0, 1500 (T = 1024): token scores 0.75, 1, 0 (capped)
    loaded = scores(snaps, "a", False, in_flight_tokens=[256, 0, 1500])
    assert loaded == pytest.approx(
        [4 * 0.8 + 0 + 0.5 + 0.75 + 3, 4 * 0.8 + 0.5 + 0 + 0.5 + 4, 0 + 0.25 + 0.5 + 1.0 + 0]
    )
    # an adapter held nowhere: the home replica gets 2 more than the stock score
    home = home_replica("c", 3)
    stock, flora = scores(snaps, "c", False), scores(snaps, "c", True)
    diff = [f - s for f, s in zip(flora, stock, strict=True)]
    assert diff == pytest.approx([2.0 if i == home else 0.0 for i in range(3)])


def test_estimate_tokens_is_the_upstream_simple_estimator() -> None:
    # input = bytes // 4 (at least 1), output = round(1.5 input), half away from zero
    assert estimate_tokens(81) == 20 + 30
    assert estimate_tokens(90) == 22 + 33
    assert estimate_tokens(12) == 3 + 5  # 4.5 rounds up, as Go's math.Round
    assert estimate_tokens(3) == 1 + 2  # 1.5 -> 2
    assert estimate_tokens(0) == 0
    assert token_load_score(0) == 1.0
    assert token_load_score(256) == 0.75  # T = 1024
    assert token_load_score(10_000) == 0.0
    assert token_load_score(50, threshold=200) == 0.75


def test_token_load_bounds_how_far_affinity_piles_onto_the_holder() -> None:
    """Replica 0 holds the adapter (running, score 1.0); 1 and 2 have free slots (0.8).
    Scrapes equal (queue and running scores tie at 1). The holder keeps the request until it
    has 0.2 T = 204.8 more tokens in flight (about four 50-token requests)."""
    snaps = [Snapshot(max_lora=8, running_adapters=frozenset({"hot"}))]
    snaps += [Snapshot(max_lora=8) for _ in range(2)]
    rng = random.Random(0)
    assert pick(snaps, "hot", False, rng, [200, 0, 0]) == 0  # 4 + 4 x 0.805 > 3.2 + 4
    assert pick(snaps, "hot", False, rng, [250, 0, 0]) in (1, 2)  # 4 + 4 x 0.756 < 7.2
    assert pick(snaps, "hot", False, rng, [250, 0, 50]) == 1  # the least loaded of the rest
    # exact totals: 4 x 1.0 + 0.5 + 0.5 + 1 + 4 x (1 - 250 / 1024) vs 4 x 0.8 + 2 + 4
    totals = scores(snaps, "hot", False, [250, 0, 0])
    assert totals == pytest.approx([6 + 4 * (1 - 250 / 1024), 9.2, 9.2])


def test_residency_holds_until_the_load_terms_outweigh_it() -> None:
    """Replica 2 holds "hot" on a device slot, idle; 0 and 1 have free slots. Each bench
    request is about 50 estimated tokens (0.195 points at weight 4, T = 1024)."""
    rng = random.Random(0)
    idle = [Snapshot(max_lora=4) for _ in range(2)]
    holder = Snapshot(max_lora=4, device=frozenset({"hot"}))
    # stock: the loaded-but-idle holder is one of three equals
    assert {pick([*idle, holder], "hot", False, rng) for _ in range(60)} == {0, 1, 2}
    # flora: 2 points ahead; the gauges at their worst (queue and running: -1) leave 1.0
    worst = Snapshot(max_lora=4, device=frozenset({"hot"}), queue=3, running=2)
    assert {pick([*idle, worst], "hot", True, rng) for _ in range(20)} == {2}
    # ... which 5 requests of 50 tokens in flight (4 x 250 / 1024 = 0.98) do not outweigh,
    assert pick([*idle, worst], "hot", True, rng, [0, 0, 250]) == 2
    # and 6 (300 tokens: 1.17 points) do
    assert pick([*idle, worst], "hot", True, rng, [0, 50, 300]) == 0
    # in the host cache: 1.6 points ahead
    cached = Snapshot(max_lora=4, host=frozenset({"hot"}))
    assert pick([*idle, cached], "hot", True, rng, [0, 0, 400]) == 2  # 1.56 < 1.6
    assert pick([*idle, cached], "hot", True, rng, [0, 0, 450]) in (0, 1)  # 1.76 > 1.6


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
    metrics.on_adapter_load("a", 0.25, ok=True)
    metrics.on_adapter_load("c", 0.5, ok=True)
    metrics.on_adapter_load("x", 4.0, ok=False)  # failed loads are not load time
    snap = parse_metrics(metrics.render().decode())
    assert (snap.queue, snap.running, snap.kv, snap.max_lora) == (2, 1, 0.5, 4)
    assert snap.running_adapters == {"a"} and snap.waiting_adapters == {"b"}
    assert snap.device == {"a", "c"} and snap.host == {"d"}
    assert (snap.store_loads, snap.host_hits, snap.load_seconds) == (2, 1, 0.75)
    for mode, seconds in (("batched", 0.01), ("batched", 0.5), ("merged", 2.0), ("base", 0.3)):
        metrics.step_seconds.labels(mode=mode).observe(seconds)
    metrics.step_seconds.labels(mode="batched").observe(3.0)
    metrics.merge_switches.inc()
    snap = parse_metrics(metrics.render().decode())
    assert (snap.steps, snap.slow_steps, snap.stuck_steps) == (5, 3, 1)  # > 0.32 s, > 2.56 s
    assert snap.merge_switches == 1
    assert snap.step_seconds == pytest.approx(5.81)
    # only the named samples are read, by exact name
    other = parse_metrics('flora_queue_length 3\nflora_queue_length_peak 9\nx{a="b"} 1\n')
    assert other.queue == 3 and other.running == 0


def test_zipf_sequence_is_seeded_and_skewed() -> None:
    seq = zipf_sequence(50, 1.1, 5000, seed=3)
    assert seq == zipf_sequence(50, 1.1, 5000, seed=3) != zipf_sequence(50, 1.1, 5000, seed=4)
    counts = Counter(seq)
    # p_1 / p_2 = 2^1.1 = 2.14; p_1 = 1 / sum_i i^-1.1 = 0.2612 for 50 adapters
    assert abs(counts[0] / 5000 - 0.2612) < 0.02
    assert 1.8 < counts[0] / counts[1] < 2.5
    assert set(seq) <= set(range(50))


def test_block_order_alternates() -> None:
    assert [block_order(["a", "b"], p) for p in range(4)] == [
        ["a", "b"], ["b", "a"], ["a", "b"], ["b", "a"]
    ]  # fmt: skip
    assert block_order(["a", "b", "c"], 1) == ["c", "b", "a"]


def test_nearest_rank_and_the_ttft_summary() -> None:
    values = [float(v) for v in range(100, 0, -1)]  # 1..100, unsorted
    assert (nearest_rank(values, 0.5), nearest_rank(values, 0.99)) == (50.0, 99.0)
    assert nearest_rank([3.0], 0.99) == 3.0
    summary = percentiles([4.0, 1.0, 3.0, 2.0], TTFT_QUANTILES)
    # ranks ceil(0.5*4)=2, ceil(0.9*4)=4, ceil(0.99*4)=4
    assert summary == {"n": 4, "p50": 2.0, "p90": 4.0, "p99": 4.0, "mean": 2.5, "max": 4.0}
    assert percentiles([], TTFT_QUANTILES)["p99"] is None


def test_policy_result_counts_only_the_measured_phase() -> None:
    state = PolicyState("affinity", ["u0", "u1"], random.Random(0), [])
    state.warm = [Snapshot(store_loads=10, host_hits=1, load_seconds=2.0),
                  Snapshot(store_loads=12, host_hits=0, load_seconds=3.0)]  # fmt: skip
    end = [Snapshot(store_loads=13, host_hits=2, load_seconds=2.6),
           Snapshot(store_loads=13, host_hits=1, load_seconds=3.2)]  # fmt: skip
    state.results = [{"status": 200, "ttft": 0.1 * (i + 1)} for i in range(7)]
    state.results.append({"status": "ReadError", "ttft": None})
    state.requests, state.adapters = [5, 3], [{"a", "b"}, {"c"}]
    out = policy_result(state, end)
    assert (out["requests"], out["ok"], out["statuses"]) == (8, 7, {"200": 7, "ReadError": 1})
    assert (out["warmup_cold_loads"], out["cold_loads"]) == (22, 4)
    assert (out["cold_loads_per_1k"], out["host_promotions_per_1k"]) == (500.0, 250.0)
    assert out["mean_cold_load_ms"] == 200.0  # (0.6 + 0.2) s / 4 loads
    assert out["ttft_s"]["n"] == 7 and out["ttft_s"]["p50"] == pytest.approx(0.4)
    assert out["per_replica"] == [
        {"requests": 5, "distinct_adapters": 2, "cold_loads": 3},
        {"requests": 3, "distinct_adapters": 1, "cold_loads": 1},
    ]


def test_summarize_ratios_and_goals() -> None:
    def policy(loads: float, p50: float, p99: float) -> dict:
        return {"cold_loads_per_1k": loads, "ttft_s": {"p50": p50, "p99": p99}}

    out = summarize(
        RoutingConfig(),
        {"round_robin": policy(200.0, 0.3, 2.0), "affinity": policy(80.0, 0.2, 1.5)},
        12.34,
        {"cpus": 2},
        {"block_pairs": 3},
    )
    assert out["cold_loads_affinity_ratio"] == 0.4
    assert out["ttft_p99_affinity_ratio"] == 0.75
    assert (out["ttft_p99_s_round_robin"], out["ttft_p50_s_affinity"]) == (2.0, 0.2)
    assert out["goals"] == {
        "cold_loads_affinity_le_half_round_robin": True,
        "ttft_p99_ratio_le_0.8": True,
    }
    assert out["wall_s"] == 12.3 and out["timing"] == {"block_pairs": 3}
    worse = summarize(
        RoutingConfig(),
        {"round_robin": policy(200.0, 0.3, 2.0), "affinity": policy(101.0, 0.2, 1.7)},
        1.0,
        {},
        {},
    )
    assert worse["goals"] == {
        "cold_loads_affinity_le_half_round_robin": False,
        "ttft_p99_ratio_le_0.8": False,
    }
    assert worse["ttft_p99_affinity_ratio"] == 0.85


def test_first_touch_names_every_adapter_once_in_a_seeded_order() -> None:
    order = first_touch(50, seed=0)
    assert sorted(order) == list(range(50))
    assert order == first_touch(50, seed=0) and order != first_touch(50, seed=1)
    assert order != list(range(50))
    # what it is for: the Zipf warm-up alone leaves adapters that the measured phase asks for
    sequence = zipf_sequence(50, 1.1, 240 + 600, 0)
    assert set(sequence[240:]) - set(sequence[:240])
