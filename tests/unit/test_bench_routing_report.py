"""bench/routing_report.py: the access-log join and the tail breakdown on hand-made
requests, and the engine step counts between two scrapes."""

from __future__ import annotations

import json
from pathlib import Path

from bench.routing_policy import Snapshot
from bench.routing_report import access_lines, engine_steps, join_access, tail_breakdown


def test_access_lines_are_joined_by_request_id(tmp_path: Path) -> None:
    log = tmp_path / "replica0.log"
    lines = [
        "INFO: not json",
        json.dumps({"message": "adapter loaded", "adapter": "a"}),  # not an access line
        json.dumps({"request_id": "p-0-1", "cold": True, "queue_s": 0.5, "ttft_s": 0.75}),
        "{broken",
        json.dumps({"request_id": "p-0-2", "cold": False, "queue_s": 0.0, "ttft_s": 0.2}),
    ]
    log.write_text("\n".join(lines) + "\n")
    found = access_lines([log])
    assert set(found) == {"p-0-1", "p-0-2"}
    results = [{"request_id": "p-0-1", "ttft": 0.8}, {"request_id": "gone", "ttft": 0.1}]
    join_access(results, found)
    assert results[0] == {
        "request_id": "p-0-1", "ttft": 0.8, "cold": True, "queue_s": 0.5, "server_ttft_s": 0.75,
    }  # fmt: skip
    assert results[1] == {"request_id": "gone", "ttft": 0.1}


def test_tail_breakdown_splits_at_the_p90() -> None:
    # ten requests: TTFT 0.1 .. 1.0; the p90 (9th smallest) is 0.9, so only 1.0 is above
    results = [
        {"ttft": 0.1 * (i + 1), "replica": i % 2, "adapter": f"a{i}", "cold": i >= 8,
         "queue_s": 0.05 * i, "server_ttft_s": 0.1 * (i + 1) - 0.01, "in_flight": i % 3}
        for i in range(10)
    ]  # fmt: skip
    results.append({"ttft": None, "replica": 0})  # failed: left out
    out = tail_breakdown(results, 2)
    assert out["joined_access_lines"] == 10
    above = out["above_p90"]
    assert (above["n"], above["cold"], above["mean_ttft_s"], above["mean_queue_s"]) == (
        1, 1, 1.0, 0.45,
    )  # fmt: skip
    assert above["mean_outside_server_s"] == 0.01 and above["mean_in_flight_at_pick"] == 0.0
    assert out["at_or_below_p90"]["n"] == 9 and out["at_or_below_p90"]["cold"] == 1
    assert (out["cold"]["n"], out["warm"]["n"]) == (2, 8)
    assert out["cold"]["mean_ttft_s"] == 0.95
    assert [r["ttft"] for r in out["slowest_10"][:2]] == [1.0, 0.9]
    # replica 0 has TTFTs 0.1, 0.3, .., 0.9 (p99 0.9), replica 1 0.2, .., 1.0
    assert out["per_replica"] == [
        {"requests": 5, "ttft_p99_s": 0.9},
        {"requests": 5, "ttft_p99_s": 1.0},
    ]
    assert tail_breakdown([{"ttft": None}], 1) == {}


def test_engine_steps_between_two_scrapes() -> None:
    warm = [Snapshot(steps=10, step_seconds=1.0, slow_steps=1, merge_switches=2), Snapshot()]
    end = [Snapshot(steps=30, step_seconds=3.0, slow_steps=4, stuck_steps=1, merge_switches=5)]
    end.append(Snapshot())
    assert engine_steps(warm, end) == [
        {"steps": 20, "mean_step_ms": 100.0, "steps_over_0.32s": 3, "steps_over_2.56s": 1,
         "merge_switches": 3},
        {"steps": 0, "mean_step_ms": None, "steps_over_0.32s": 0, "steps_over_2.56s": 0,
         "merge_switches": 0},
    ]  # fmt: skip
