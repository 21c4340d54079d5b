"""`python bench/gpu.py --engine --dry-run`: the GPU engine bench's whole path on the CPU
(engine v2 with the recorded-graph runner) writes its JSON with sane values."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_engine_dry_run_writes_every_key(tmp_path) -> None:
    env = {"OUT": str(tmp_path), "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--engine", "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_engine_dry_run.json").read_text())
    assert result["runner"] == "GraphedPagedRunner"
    assert result["graph_check_ok"] and result["graph_check_replays"] == 3 + 12
    assert result["graph_check_max_rel_err"] < 1e-3
    assert result["batches"] == [4, 8] and result["adapters"] == 4
    # every decode step of the timed runs replays a graph (two shapes per batch and kind),
    # and so do the prefills: at most 9 token buckets (up to the budget of 64) x 4 widths
    # (contexts under 128 positions) x 2 kinds
    assert result["graph_replays"] >= 4 * result["new_tokens"]
    assert 4 <= result["graphs_recorded"] <= 72
    # greedy streams: most decode steps were launched ahead and adopted
    ahead = result["steps_ahead"]
    assert ahead["launched"] >= ahead["adopted"] >= 2 * result["new_tokens"]
    assert set(result["base_decode_tok_s"]) == {"4", "8"}
    assert all(v > 0 for v in result["base_decode_tok_s"].values())
    assert result["eager_base_decode_tok_s"] > 0
    # prefill steps replay graphs too: the prompts of the TTFT check fit the step budget
    assert result["eager_steps"] == 0
    assert result["eager_ttft_cold_ms"] > 0 and result["graph_ttft_speedup"] > 0
    for prefix in ("", "eager_"):  # the stall keys, with graphs and without
        gap, ttft = result[f"{prefix}stall_worst_gap_s"], result[f"{prefix}stall_long_ttft_s"]
        assert gap > 0 and ttft > 0
        assert result[f"{prefix}prefill_stall_ratio"] == pytest.approx(gap / ttft, rel=1e-3)
    assert set(result["decode_tok_s_rounds"]) == {
        "k", "merged", "base4", "base8", "base_not_ahead", "k_no_prologues", "base_unshared",
        "k_512x128", "k_1024x128", "k_256x256", "long", "long_unsplit",
    }  # fmt: skip
    assert result["prologue_speedup"] is None  # no fused kernels on the CPU
    assert result["sibling_speedup"] is None and result["row_block_ratio"] is None
    assert result["split_speedup"] is None and result["long_decode_tok_s"] > 0
    for key in ("decode_ratio_k", "decode_ratio_merged", "graph_speedup", "ahead_speedup"):
        assert 0.05 < result[key] < 20, key
    assert result["ttft_hit_ms"] > 0 and result["ttft_cold_ms"] > 0
    for kind in ("base", "k"):  # a graph of each kind at the first batch size, replayed alone
        replay, step = result["graph_replay_ms"][kind], result["step_ms"][kind]
        assert replay > 0 and step > 0
        assert result["host_share"][kind] == round(1 - replay / step, 3)
    assert 0 < result["ttft_prefix_hit_ratio"] < 5
    assert set(result["goals"]) == {
        "base_decode_vs_old_engine",
        "base_decode_goal_10x",
        "k_ratio_goal_0_95",
    }


@pytest.mark.timeout(300)
def test_a_race_over_the_adapter_kernels_block_records_each_setting_and_restores_it(
    monkeypatch,
) -> None:  # type: ignore[no-untyped-def]
    """`row_blocks` variants (a setting the runner cannot see) set the adapter kernel's
    decode tiles and drop the recorded graphs before they run, and back after: every graph
    a variant replays was recorded with its own setting, and the default is left in place."""
    import asyncio
    import dataclasses
    from types import SimpleNamespace

    from bench import gpu_engine
    from bench.gpu_engine import Variant
    from bench.gpu_engine_setup import DRY, build_model, make_adapters, start_engine

    kernel = SimpleNamespace(decode_block_k=256, decode_block_n=128)  # no Triton on the CPU
    monkeypatch.setattr(gpu_engine, "row_kernel", lambda engine: kernel)
    sizes = dataclasses.replace(DRY, rounds=1, adapters=2, batches=(2,), new_tokens=8)
    model = build_model(sizes)
    adapters = make_adapters(model, sizes)
    engine = start_engine(model, adapters, sizes, "auto", dry=True)
    try:
        runner = engine._stepper.runner
        record = runner._record
        recorded: list[tuple[int, int]] = []  # the kernel's tiles at each graph recorded

        def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
            recorded.append((kernel.decode_block_k, kernel.decode_block_n))
            return record(*args, **kwargs)

        monkeypatch.setattr(runner, "_record", recording)
        names = list(adapters)
        times = gpu_engine.race(
            engine,
            sizes,
            {"k": Variant(2, names), "k512": Variant(2, names, row_blocks=(512, 64))},
        )
    finally:
        asyncio.run(engine.shutdown(30))
    assert (kernel.decode_block_k, kernel.decode_block_n) == (256, 128)
    # graphs recorded anew at each change: the warm-up of each, the round of each, then the
    # default once more (without the drop, the 512 runs would replay the 256 graphs)
    default, other = (256, 128), (512, 64)
    assert [k for k, _ in itertools.groupby(recorded)] == [default, other] * 2 + [default]
    assert {name: len(t) for name, t in times.items()} == {"k": 1, "k512": 1}


@pytest.mark.timeout(300)
def test_the_decode_numbers_are_saved_as_soon_as_the_race_ends() -> None:
    """A stage that runs out of the device session's time (the TTFT checks, py-spy, the
    graph check) must not take the decode race's numbers with it: `run` saves them first."""
    import copy
    import dataclasses

    from bench import gpu_engine
    from bench.gpu_engine_setup import DRY

    saved: list[dict] = []
    sizes = dataclasses.replace(DRY, rounds=1)
    final = gpu_engine.run(sizes, True, lambda result: saved.append(copy.deepcopy(result)))
    early = [s for s in saved if "decode_ratio_k" in s and "ttft_cold_ms" not in s]
    assert early and early[0]["goals"] == final["goals"]
    assert early[0]["decode_tok_s_rounds"] == final["decode_tok_s_rounds"]
