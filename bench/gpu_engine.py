"""Engine v2 end to end on CUDA with step graphs (issue 16 item 5); writes one JSON file.

    python bench/gpu.py --engine            # on the CUDA machine, bf16, under 8 minutes
    python bench/gpu.py --engine --dry-run  # the same path on the CPU, tiny sizes, seconds

The real `PagedLLMEngine` (worker thread, scheduler, paged KV pool, sampler, events) over
`LlamaForCausalLM` with SmolLM2-135M's shapes and random weights (as `bench/gpu.py`: no
weight files travel to the GPU machine), `K` random rank-8 FLoRA adapters on
q,k,v,o,gate,up,down, token ids fed directly (a stand-in tokenizer only detokenizes).
Requests ignore EOS so every stream runs its full length. Keys:

- ``base_decode_tok_s``: per batch size (32 and 128), tokens per second over the window
  where every stream is decoding (from the point every stream has its first few tokens
  to the first stream's last token), median over rounds; ``eager_base_decode_tok_s`` the
  same at the first batch size with ``cuda_graphs=off``, and ``graph_speedup`` their
  ratio.
- ``decode_ratio_k``: batch 32 with every row on its own adapter (K = 32) over base;
  ``decode_ratio_merged``: every row on one adapter (the engine merges it) over base;
  both the median over rounds of per-round ratios, the variants run in rotated order
  each round (``decode_tok_s_rounds`` keeps every sample).
- ``ttft_prefix_hit_ratio``: TTFT of a prompt whose 600-token prefix is cached over the
  same prompt cold (``ttft_cold_ms``, ``ttft_hit_ms``); ``eager_ttft_cold_ms`` /
  ``eager_ttft_hit_ms`` the same prompts with ``cuda_graphs=off``, and
  ``graph_ttft_speedup`` eager cold over graphed cold (prefill steps replay graphs);
  ``eager_steps``: the graphed engine's steps that no graph served.
- ``prefill_stall_ratio``: the worst inter-token gap of 4 decoding streams while a
  3,500-token prompt prefills, over that prompt's TTFT (``stall_worst_gap_s``,
  ``stall_long_ttft_s``; the CPU suite's key of the same name); ``eager_`` the same with
  ``cuda_graphs=off``.
- ``graph_replay_ms``: one replay of the graph the engine replayed most at the first batch
  size (base rows, and with the adapters of ``k``), timed alone; ``step_ms`` the engine's step
  at those settings (from the tok/s) and ``host_share`` 1 - replay / step, the part of a
  step spent outside the GPU (in a dry run the "replay" re-runs the recorded Python).
- ``replay_kernels`` (CUDA): that replay's kernels from torch.profiler: how many (against
  ``bench/step_census.py``'s count), their GPU time, each name's time and launches;
  ``fused_kernels``: whether the engine ran the fused
  decode attention and RMSNorm (``flora_server.engine.paged.fused``).
- ``steps_ahead``: decode steps launched before the previous step's tokens reached the
  host, and how many of them the engine adopted (``flora_server.engine.paged.ahead``: the
  host's work of step n overlaps the device's of step n + 1); ``ahead_speedup``: base
  decode at the first batch size over the same with ``decode_ahead`` off, raced in the
  same rounds.
- ``prologue_speedup``: K decode with the adapter deltas computed inside the fused norms,
  SiLU-multiply and decode attention over the same with them in launches of their own
  (``FusedKernels.prologues`` off), raced in the same rounds; ``None`` without the fused
  kernels (a dry run).
- ``sibling_speedup``: base decode at the first batch size with q/k/v's and gate/up's
  GEMMs one each over the same with a GEMM per projection (``FusedKernels.sibling_gemms``
  off), raced in the same rounds; ``None`` without the fused kernels.
- ``row_block_ratio``: K decode with other tiles of the adapter kernels' decode programs
  (``"KxN"``: ``TritonRowKernel.decode_block_k`` inputs a step of the shrink, fewer
  dependent rounds of loads for more registers; ``decode_block_n`` outputs a program,
  fewer programs each redoing the shrink for a longer expand) over the same at the
  default tiles, raced in the same rounds; ``None`` without the Triton adapter kernel.
- ``long_decode_tok_s``: base decode of 4 streams after ``long_prompt``-token prompts
  (the decode attention splits each row's keys across programs there), and
  ``split_speedup`` over the same with the split off, raced in the same rounds (None
  without the fused kernels).
- ``graph_check_*``: recorded steps against the eager runner in float32 on two layers
  (prefills, a prefill chunk packed with decode rows, adapters, padding rows, a load
  between replays, merged mode): largest relative logits error, replays, ok.
- ``profiles`` (with ``--profile``): for base rows and for ``k`` at the first batch size,
  py-spy samples the process (every thread, raw folded stacks) for a few seconds while
  the engine decodes, into ``$OUT/pyspy_<kind>.txt``: where the host's share of a step
  goes. Needs the ``py-spy`` program on PATH; missing, the key says so.
- ``goals``: base decode at batch 32 >= 10x the 1,189 tok/s the old engine measured on
  the H200, and ``decode_ratio_k`` >= 0.95.

The dry run uses `RecordedCapture` (the recorded Python re-runs on replay) in place of
CUDA graphs, a 2-layer model and batches of 4 and 8: every part but the CUDA call runs.
Output: ``$OUT/gpu_engine.json`` (``gpu_engine_dry_run.json`` for a dry run), ``$OUT``
defaulting to ``bench/results``.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "server"):  # the repo's `flora` and `flora_server`
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402

from bench.gpu_engine_setup import DRY, Sizes, build_model, make_adapters, start_engine  # noqa: E402
from bench.gpu_probes import graph_check, profile, replay_kernels, replay_ms  # noqa: E402

OLD_ENGINE_BASE_TOK_S = 1189.0  # the old engine's base decode at batch 32 on the H200
ROW_BLOCKS = ((512, 128), (1024, 128), (256, 256))  # decode tiles raced against the default


async def stream(engine: Any, prompt: list[int], adapter: str | None, new: int) -> list[float]:
    """One greedy request through EOS; returns [submit time, each token's time...]."""
    from flora_server.engine.protocol import GenerationRequest, SamplingParams, TokenEvent

    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    req = GenerationRequest(f"r{random.random()}", prompt, params, adapter)
    times = [time.perf_counter()]
    async for event in engine.generate(req):
        if isinstance(event, TokenEvent):
            times.append(time.perf_counter())
    return times


def decode_tok_s(
    engine: Any,
    sizes: Sizes,
    batch: int,
    adapters: list[str | None],
    rng: random.Random,
    prompt: int | None = None,
) -> float:
    """Tokens per second while all `batch` streams decode (see the module docstring),
    after prompts of `prompt` tokens (default `sizes.prompt`)."""

    async def main() -> list[list[float]]:
        prompts = [ids(rng, sizes, prompt or sizes.prompt) for _ in range(batch)]
        jobs = [
            stream(engine, p, adapters[i % len(adapters)], sizes.new_tokens)
            for i, p in enumerate(prompts)
        ]
        return list(await asyncio.gather(*jobs))

    marks = asyncio.run(main())
    # From the point every stream has its first few tokens (past a merge the engine may
    # make after its first steps) to the first stream's last token.
    skip = max(1, sizes.new_tokens // 16)
    start = max(m[skip] for m in marks)
    end = min(m[-1] for m in marks)
    tokens = sum(1 for m in marks for t in m[skip + 1 :] if start < t <= end)
    if end <= start or tokens == 0:
        raise RuntimeError(f"no window where all {batch} streams decode")
    return tokens / (end - start)


class Variant(NamedTuple):
    """A decode run of `batch` streams, their rows' adapters cycled, on the engine's
    settings: `ahead` (`PagedStepper.decode_ahead`), `prologues` (`FusedKernels.prologues`,
    the adapter deltas inside the fused norms and SiLU-multiply), `siblings`
    (`FusedKernels.sibling_gemms`, base rows' q/k/v and gate/up in one GEMM each) and
    `split` (decode attention may split a row's keys across programs:
    `FusedKernels.programs_wanted`, 0 when off); `row_blocks`: the adapter kernels'
    decode tiles (`TritonRowKernel.decode_block_k`, `decode_block_n`; None: the default).
    Changing a setting drops the recorded graphs, recorded again in the run's first
    steps, before its timed window. `prompt`: tokens per prompt (default
    `sizes.prompt`)."""

    batch: int
    adapters: list[str | None]
    ahead: bool = True
    prologues: bool = True
    siblings: bool = True
    split: bool = True
    prompt: int | None = None
    row_blocks: tuple[int, int] | None = None

    @property
    def default(self) -> bool:
        return (
            self.ahead and self.prologues and self.split and self.siblings and not self.row_blocks
        )


def race(engine: Any, sizes: Sizes, variants: dict[str, Variant]) -> dict[str, list[float]]:
    """Each variant once as a warm-up (adapter loads, graph recordings, the allocator),
    then `sizes.rounds` rounds of all of them, in an order rotated each round, then those
    on the default settings once more where another dropped the graphs (those timed alone
    afterwards are then recorded with the default settings); returns each variant's tok/s
    per round."""
    rng = random.Random(0)
    stepper = engine._stepper
    fused = getattr(stepper.runner, "fused", None)
    wanted = fused.programs_wanted if fused is not None else 0
    kernel = row_kernel(engine)
    blocks = (kernel.decode_block_k, kernel.decode_block_n) if kernel is not None else None

    def settle(variant: Variant) -> None:
        # read by the worker per step and per recording; no step is in flight here
        stepper.decode_ahead = variant.ahead
        if fused is not None:
            fused.prologues = variant.prologues
            fused.sibling_gemms = variant.siblings
            fused.programs_wanted = wanted if variant.split else 0
        want = variant.row_blocks or blocks
        if kernel is not None and want != (kernel.decode_block_k, kernel.decode_block_n):
            kernel.decode_block_k, kernel.decode_block_n = want  # baked into the recordings
            stepper.runner.drop_graphs()

    def one(variant: Variant) -> float:
        settle(variant)
        try:
            return decode_tok_s(engine, sizes, variant.batch, variant.adapters, rng, variant.prompt)
        finally:
            settle(Variant(0, []))  # the default settings

    for variant in variants.values():
        one(variant)
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(sizes.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(one(variants[name]))
    # Unmeasured: a variant off the default settings dropped the recorded graphs, so the
    # default ones run again and the graphs timed alone afterwards are theirs.
    defaults = [name for name in names if variants[name].default]
    if len(defaults) < len(names):
        for name in defaults:
            one(variants[name])
    return times


def row_kernel(engine: Any) -> Any:
    """The Triton adapter kernel the engine's modules launch (None where it does not serve:
    the CPU, a failed self-test)."""
    from flora.serving.backends.triton_gpu import gpu_kernel_for

    weight = next(engine._model.parameters())
    return gpu_kernel_for(True, weight.device, weight.dtype)


LONG_STREAMS = 4  # `long_decode_tok_s`: few rows over long keys, where the keys split


def median_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of the per-round ratio (a drift of the machine hits both)."""
    return round(statistics.median(a / b for a, b in zip(times[num], times[den], strict=True)), 4)


def prefix_ttft(engine: Any, sizes: Sizes) -> dict[str, float]:
    rng = random.Random(7)
    cold, hit = [], []
    for _ in range(sizes.prefix_rounds + 1):  # the first round warms the shapes
        prompt = ids(rng, sizes, sizes.prefix + sizes.question)
        a = asyncio.run(stream(engine, prompt, None, 1))
        b = asyncio.run(stream(engine, prompt, None, 1))
        cold.append(a[1] - a[0])
        hit.append(b[1] - b[0])
    cold_s, hit_s = statistics.median(cold[1:]), statistics.median(hit[1:])
    return {
        "ttft_cold_ms": round(1000 * cold_s, 2),
        "ttft_hit_ms": round(1000 * hit_s, 2),
        "ttft_prefix_hit_ratio": round(hit_s / cold_s, 4),
    }


def stall(engine: Any, sizes: Sizes) -> dict[str, float]:
    """`bench.engine.prefill_stall` (the CPU suite's `prefill_stall_ratio`): the worst
    inter-token gap of 4 decoding streams while a `sizes.long_prompt` prompt prefills, over
    that prompt's TTFT."""
    from bench.engine import EngineBenchConfig, prefill_stall

    cfg = EngineBenchConfig(long_prompt_tokens=sizes.long_prompt, streams=4)
    result = prefill_stall(engine, cfg, random.Random(11), lambda rng, n: ids(rng, sizes, n))
    return {k: round(v, 4 if k.endswith("ratio") else 6) for k, v in result.items()}


def ids(rng: random.Random, sizes: Sizes, n: int) -> list[int]:
    """n prompt tokens of the bench model (ids 0-2 are its specials)."""
    return [rng.randrange(3, sizes.vocab) for _ in range(n)]


def race_keys(times: dict[str, list[float]], sizes: Sizes, engine: Any) -> dict[str, Any]:
    """The keys of `run`'s race (see the module docstring): decode tok/s, the ratios and
    speedups of the variants, every round's sample, the goals."""
    first = sizes.batches[0]
    base = {b: statistics.median(times[f"base{b}"]) for b in sizes.batches}
    fused = getattr(engine._stepper.runner, "fused", None) is not None  # else no difference
    tuned = row_kernel(engine) is not None  # else the tile variants differ in nothing
    keys: dict[str, Any] = {
        "base_decode_tok_s": {str(b): round(v, 1) for b, v in base.items()},
        "decode_ratio_k": median_ratio(times, "k", f"base{first}"),
        "decode_ratio_merged": median_ratio(times, "merged", f"base{first}"),
        "ahead_speedup": median_ratio(times, f"base{first}", "base_not_ahead"),
        "prologue_speedup": median_ratio(times, "k", "k_no_prologues") if fused else None,
        "sibling_speedup": median_ratio(times, f"base{first}", "base_unshared") if fused else None,
        "row_block_ratio": (
            {f"{k}x{n}": median_ratio(times, f"k_{k}x{n}", "k") for k, n in ROW_BLOCKS}
            if tuned
            else None
        ),
        "long_decode_tok_s": round(statistics.median(times["long"]), 1),
        "split_speedup": median_ratio(times, "long", "long_unsplit") if fused else None,
        "decode_tok_s_rounds": {k: [round(v, 1) for v in t] for k, t in times.items()},
    }
    vs_old = base[first] / OLD_ENGINE_BASE_TOK_S
    keys["goals"] = {
        "base_decode_vs_old_engine": round(vs_old, 2),
        "base_decode_goal_10x": bool(vs_old >= 10),
        "k_ratio_goal_0_95": bool(keys["decode_ratio_k"] >= 0.95),
    }
    return keys


def run(
    sizes: Sizes,
    dry: bool,
    save: Callable[[dict[str, Any]], None],
    profile_dir: Path | None = None,
) -> dict[str, Any]:
    """The measurements, then the graph check; `save` gets the result after each stage, so
    a stage that kills the process (a CUDA error poisons the context) keeps the earlier
    ones' numbers."""
    started = time.perf_counter()
    cuda = not dry and torch.cuda.is_available()
    if not dry and not cuda:
        raise SystemExit("no CUDA device: run with --dry-run for the CPU check")
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    model = build_model(sizes)
    adapters = make_adapters(model, sizes)
    reference = copy.deepcopy(model)  # graph_check's: float32, never wrapped
    model = model.to(device=device, dtype=dtype)
    names: list[str | None] = list(adapters)
    first = sizes.batches[0]
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (dry run)",
        "torch": torch.__version__,
        "dtype": str(dtype),
        "layers": sizes.layers,
        "batches": list(sizes.batches),
        "adapters": sizes.adapters,
        "prompt_tokens": sizes.prompt,
        "new_tokens": sizes.new_tokens,
        "rounds": sizes.rounds,
    }
    from transformers import __version__ as transformers_version

    result["transformers"] = transformers_version
    # The eager engine serves base rows only: the model's modules stay unwrapped for the
    # graphed engine's own ServingModel (one ServingModel may wrap a model).
    engine = start_engine(model, adapters, sizes, "off", dry)
    try:
        eager = race(engine, sizes, {"base": Variant(first, [None])})
        eager_ttft = prefix_ttft(engine, sizes)
        eager_stall = stall(engine, sizes)
    finally:
        asyncio.run(engine.shutdown(30))
    result["eager_base_decode_tok_s"] = round(statistics.median(eager["base"]), 1)
    result.update({f"eager_{k}": v for k, v in eager_ttft.items() if k.endswith("_ms")})
    result.update({f"eager_{k}": v for k, v in eager_stall.items()})
    save(result)
    engine = start_engine(model, adapters, sizes, "auto", dry)
    runner = engine._stepper.runner
    long = sizes.long_prompt
    variants: dict[str, Variant] = {
        "k": Variant(first, names),  # first: its warm-up loads every adapter
        "merged": Variant(first, names[:1]),
        **{f"base{b}": Variant(b, [None]) for b in sizes.batches},
        "base_not_ahead": Variant(first, [None], ahead=False),  # what decoding ahead gains
        "k_no_prologues": Variant(first, names, prologues=False),  # the deltas in the norms
        "base_unshared": Variant(first, [None], siblings=False),  # a GEMM for each sibling
        **{f"k_{k}x{n}": Variant(first, names, row_blocks=(k, n)) for k, n in ROW_BLOCKS},
        "long": Variant(LONG_STREAMS, [None], prompt=long),
        "long_unsplit": Variant(LONG_STREAMS, [None], split=False, prompt=long),
    }
    try:
        times = race(engine, sizes, variants)
        result.update(race_keys(times, sizes, engine))
        save(result)  # the decode numbers are kept if a later stage runs out of time
        result.update(prefix_ttft(engine, sizes))
        result.update(stall(engine, sizes))
        if profile_dir is not None:
            seconds = 2 if dry else 8
            rng = random.Random(5)
            result["profiles"] = {
                kind: profile(
                    lambda rows=rows: decode_tok_s(engine, sizes, first, rows, rng),
                    profile_dir / f"pyspy_{kind}.txt",
                    seconds,
                )
                for kind, rows in (("base", [None]), ("k", names))
            }
    finally:
        asyncio.run(engine.shutdown(30))
    base = {b: statistics.median(times[f"base{b}"]) for b in sizes.batches}
    result["runner"] = type(runner).__name__
    result["graphs_recorded"] = len(getattr(runner, "graphs", {}))
    result["graph_replays"] = getattr(runner, "replays", 0)
    result["eager_steps"] = getattr(runner, "eager_steps", 0)  # steps no graph served
    # prefill steps through graphs against the same prompts' steps with graphs off
    result["graph_ttft_speedup"] = round(result["eager_ttft_cold_ms"] / result["ttft_cold_ms"], 3)
    stepper = engine._stepper
    result["steps_ahead"] = {
        "launched": getattr(stepper, "ahead_launched", 0),
        "adopted": getattr(stepper, "ahead_adopted", 0),
    }
    result["graph_speedup"] = round(base[first] / result["eager_base_decode_tok_s"], 3)
    # The engine's step against the bare replay of its graph: what is left is host time.
    with torch.inference_mode():
        replays = {kind: replay_ms(runner, first, kind == "k") for kind in ("base", "k")}
    # Rounded before the share is taken, so the three reported numbers agree exactly.
    steps = {
        kind: round(1000 * first / tok_s, 3)
        for kind, tok_s in (("base", base[first]), ("k", statistics.median(times["k"])))
    }
    result["graph_replay_ms"] = replays
    with torch.inference_mode():
        result["replay_kernels"] = {
            kind: replay_kernels(runner, first, kind == "k") for kind in ("base", "k")
        }
    result["fused_kernels"] = getattr(runner, "fused", None) is not None
    result["step_ms"] = steps
    result["host_share"] = {
        kind: None if replays[kind] is None else round(1 - replays[kind] / steps[kind], 3)
        for kind in steps
    }
    save(result)
    result.update(graph_check(reference, adapters, device, dry))
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--engine", action="store_true", help="(what bench/gpu.py passes on)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, seconds")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3)")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy stacks of decode into $OUT (see profiles)"
    )
    args = parser.parse_args(argv)
    out = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("gpu_engine_dry_run.json" if args.dry_run else "gpu_engine.json")

    def save(result: dict[str, Any]) -> None:
        path.write_text(json.dumps(result, indent=2) + "\n")

    sizes = DRY if args.dry_run else Sizes()
    if args.rounds is not None:
        sizes = dataclasses.replace(sizes, rounds=args.rounds)
    result = run(sizes, args.dry_run, save, out if args.profile else None)
    save(result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
