"""``python -m bench.run [--quick]``: the benchmark suite (issue 6).

Writes ``bench/results/<name>.json`` (``quick`` or ``full``) and PNG plots beside it.
Every number is a ratio of variants measured side by side in one run (interleaved
rounds, median of per-round ratios); absolute times are recorded for context only.
``--quick`` (about 3 minutes on a quiet 2-core VM; more under a neighbour's load): decode
K = 1/4/32, vs PEFT, vs naive hot swap, prefill, cold load, engine v2 vs v1 (bench/engine.py;
``--only-engine`` runs that part alone and updates its keys in the existing file). The
full run repeats more and adds the HTTP load generator and the 1,000-adapter scale test.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.engine import ENGINE_GOALS_MAX, ENGINE_GOALS_MIN

GOALS = {
    "decode_ratio_k1": 0.98,
    "decode_ratio_k4": 0.95,
    "decode_ratio_k32": 0.90,
    "vs_peft_k32": 3.0,
    "vs_naive_swap": 8.0,
    "prefill_ratio_k8": 0.95,
}
COLD_LOAD_GOAL_MS = 50.0
# Engine v2 (bench/engine.py owns them): upper bounds, and the goodput's lower bound.
ENGINE_GOALS = {**ENGINE_GOALS_MAX, **ENGINE_GOALS_MIN}


def machine() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
        "dtype": "float32",
        "device": "cpu",
    }


def verdicts(results: dict[str, Any]) -> dict[str, bool]:
    out = {k: results[k] >= g for k, g in GOALS.items() if k in results}
    if "cold_load_ms_p50" in results:
        out["cold_load_ms_p50"] = results["cold_load_ms_p50"] <= COLD_LOAD_GOAL_MS
    if "server_5xx" in results:
        out["server_5xx"] = results["server_5xx"] == 0
    if "scale_rss_within_budget" in results:
        out["scale_rss_within_budget"] = bool(results["scale_rss_within_budget"])
    from bench.engine import engine_verdicts

    out.update(engine_verdicts(results))
    return out


def engine_config(quick: bool) -> Any:
    from bench.engine import EngineBenchConfig

    return EngineBenchConfig(open_requests=8, prefix_rounds=2) if quick else EngineBenchConfig()


def engine_only(args: argparse.Namespace) -> int:
    """The engine suite alone; its keys replace those in the existing results file."""
    from bench import engine

    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {msg}", flush=True)

    name = "quick" if args.quick else "full"
    path = args.out / f"{name}.json"
    report = json.loads(path.read_text()) if path.exists() else {"name": name}
    load_at_start = os.getloadavg()
    results = engine.engine_suite(log, engine_config(args.quick))
    results["engine_machine"] = {**machine(), "load_average_at_start": load_at_start}
    results["engine_seconds"] = time.perf_counter() - started
    report.update(results)
    report["goals"] = {**report.get("goals", {}), **ENGINE_GOALS}
    report["meets_goal"] = {**report.get("meets_goal", {}), **engine.engine_verdicts(results)}
    path.write_text(json.dumps(report, indent=2, default=float) + "\n")
    for key in ENGINE_GOALS:
        print(f"  {key:26s} {results.get(key)}  goal {ENGINE_GOALS[key]}")
    return 0


def server_suites(log: Callable[[str], None]) -> dict[str, Any]:
    """Items 6 and 7 (full run only): each starts its own `flora-serve` on 127.0.0.1. A
    failure is recorded under the item's key rather than losing the rest of the run."""
    from bench import scale, server_load

    out: dict[str, Any] = {}
    for key, fn in (
        ("server_load", lambda: server_load.run(server_load.LoadConfig(), log)),
        ("scale", lambda: scale.run(scale.ScaleConfig(), log)),
    ):
        try:
            out[key] = fn()
        except Exception as exc:  # a bench run reports, it does not stop half-way
            out[key] = {"error": f"{type(exc).__name__}: {exc}"}
        log(f"{key} done")
    load, sc = out["server_load"], out["scale"]
    if "error" not in load:
        out["server_5xx"] = load["count_5xx"]
        out["server_429"] = load["count_429"]
    if "error" not in sc:
        out["scale_rss_within_budget"] = sc["rss_within_budget"]
        out["models_latency_ms_p50"] = sc["models_latency_ms_p50"]
        out["models_latency_ms_p99"] = sc["models_latency_ms_p99"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument(
        "--only-engine",
        action="store_true",
        help="run only the engine v2 vs v1 suite and update its keys in the existing JSON",
    )
    args = parser.parse_args(argv)
    if args.only_engine:
        return engine_only(args)
    from bench import coldload, decode, engine, plots
    from bench.workload import load_base
    from flora.serving import ServingPolicy

    name = "quick" if args.quick else "full"
    cfg = (
        decode.DecodeConfig(peft=not args.no_peft)
        if args.quick
        else decode.DecodeConfig(
            rounds=11,
            steps=6,
            peft_steps=3,
            request_tokens=32,
            swap_rounds=5,
            prefill_rounds=5,
            peft=not args.no_peft,
        )
    )
    started = time.perf_counter()
    load_at_start = os.getloadavg()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {msg}", flush=True)

    torch.manual_seed(0)
    model = load_base()
    log("model loaded")
    fixture = coldload.prepare(model)
    peft_model = decode.build_peft(model, 32) if cfg.peft else None
    log("peft built")
    # The same 32 adapters with bfloat16 factor banks, on a copy of the base (the
    # factor_dtype comparison: half the bytes per distinct adapter).
    narrow_model = copy.deepcopy(model)
    serving = decode.build_serving(model, 32)
    narrow = decode.build_serving(narrow_model, 32, ServingPolicy(factor_dtype=torch.bfloat16))
    log("32 adapters loaded (float32 and bfloat16 factor banks)")
    results: dict[str, Any] = {}
    results.update(
        decode.decode_suite(model, serving, cfg, peft_model, log, narrow=(narrow_model, narrow))
    )
    del narrow, narrow_model
    del peft_model
    log("decode/prefill done")
    results.update(coldload.cold_load_suite(serving, fixture, 15 if args.quick else 41, slot=31))
    log("cold load done")
    del serving
    results.update(engine.engine_suite(log, engine_config(args.quick)))
    log("engine v2 vs v1 done")
    if not args.quick:
        results.update(server_suites(log))
    results["seconds"] = time.perf_counter() - started
    report = {
        "name": name,
        "machine": {**machine(), "load_average_at_start": load_at_start},
        "config": cfg.__dict__,
        **results,
        "goals": {**GOALS, **ENGINE_GOALS, "cold_load_ms_p50": COLD_LOAD_GOAL_MS, "server_5xx": 0},
        "meets_goal": verdicts(results),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    bars = {k: results[k] for k in GOALS if k in results and not k.startswith("vs_")}
    plots.ratio_chart(args.out / f"{name}_ratios.png", "speed vs base (1.0 = free)", bars, GOALS)
    vs = {k: results[k] for k in GOALS if k.startswith("vs_") and k in results}
    plots.ratio_chart(args.out / f"{name}_vs.png", "flora speed-up over alternatives", vs, GOALS)
    log(f"wrote {args.out / f'{name}.json'}")
    for key in [*GOALS, "cold_load_ms_p50"]:
        if key in results:
            print(f"  {key:22s} {results[key]:8.3f}  goal {report['goals'][key]}")
    for key in ("decode_ratio_k4_bf16", "decode_ratio_k32_bf16"):
        if key in results:
            print(f"  {key:22s} {results[key]:8.3f}  (bfloat16 factor banks, no goal)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
