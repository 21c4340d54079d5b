"""One-shot CUDA check of flora.serving (issue 6, item 3); prints one JSON line.

Needs only torch + transformers (+ safetensors) and this repository's ``flora`` package: no
server packages, no SmolLM2 files. Builds ``LlamaForCausalLM`` from SmolLM2-135M's config
with random weights (same shapes), loads 32 random rank-8 adapters on
q,k,v,o,gate,up,down, and for bf16 and fp32 measures, side by side (interleaved rounds,
median of per-round ratios):

- decode, batch 32: K = 1 (merged), 1 (batched), 4, 32 distinct adapters vs base;
- prefill, 8 x 512 tokens, K = 8 vs base;

each through both per-row paths on CUDA: "triton" (the default where its self-test passes,
``flora.serving.backends.triton_gpu``) and "torch" (``ServingPolicy(gpu_kernel=False)``). Then it
checks each path against the plain reference (fp32 logits of a mixed batch with ranks 4,
8, 16 and a base row, each row vs the model with that adapter's ``W + dW`` computed by
``flora.serving.reference``).

    python bench/gpu.py            # on the CUDA machine, < 4 minutes
    python bench/gpu.py --tiny     # a 2-layer smoke run (CPU is fine)
    python bench/gpu.py --engine   # engine v2 end to end with CUDA graphs (bench/gpu_engine.py)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

# Run as a script, bench/ leads sys.path, and bench/kernels.py would shadow the `kernels`
# package transformers looks for: the repo root goes there instead (the repo's `flora`).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from bench.gpu_engine_setup import PROJ, Sizes, build_model  # noqa: E402
from flora.serving import ModuleFactors, ServingModel, ServingPolicy  # noqa: E402
from flora.serving.backends.triton_gpu import triton_row_kernel  # noqa: E402
from flora.serving.reference import reference_model_weights  # noqa: E402


def smollm2(layers: int):  # type: ignore[no-untyped-def]
    """SmolLM2-135M's shapes with `layers` layers and random weights (seed 0)."""
    return build_model(Sizes(layers=layers))


def cache_kwarg() -> str:
    from transformers import __version__

    return "cache" if int(__version__.split(".")[0]) >= 5 else "past_key_values"


def adapter(model, seed: int, rank: int) -> dict[str, ModuleFactors]:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in PROJ:
            n_out, n_in = mod.weight.shape
            out[name] = ModuleFactors(
                "linear",
                torch.randn(rank, rank, generator=gen),
                (
                    torch.randn(n_out, rank, generator=gen) * 0.05,
                    torch.randn(n_in, rank, generator=gen) * 0.05,
                ),
                1.0,
            )
    return out


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def decoder(model, ids: torch.Tensor, steps: int):  # type: ignore[no-untyped-def]
    """A timing sample: prefill once (untimed), then ``steps`` greedy decode steps."""
    from transformers import DynamicCache

    kw = cache_kwarg()
    state: dict = {}

    def run() -> float:
        with torch.inference_mode():
            if not state:
                state["cache"] = DynamicCache()
                out = model(input_ids=ids, use_cache=True, **{kw: state["cache"]})
                state["next"] = out.logits[:, -1].argmax(-1)
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                out = model(
                    input_ids=state["next"][:, None], use_cache=True, **{kw: state["cache"]}
                )
                state["next"] = out.logits[:, -1].argmax(-1)
            sync()
            return (time.perf_counter() - start) / steps

    return run


def race(samples: dict, setups: dict, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in samples}
    names = list(samples)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            setups[name][0]()
            times[name].append(samples[name]())
            setups[name][1]()
    return times


def med_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    return round(statistics.median(a / b for a, b in zip(times[num], times[den], strict=True)), 4)


def bench_dtype(
    dtype: torch.dtype, device: str, args: argparse.Namespace, policy: ServingPolicy
) -> dict:
    model = smollm2(args.layers).to(device=device, dtype=dtype)
    serving = ServingModel(model, max_slots=32, max_rank=64, policy=policy)
    t0 = time.perf_counter()
    for s in range(32):
        serving.load_modules(s, adapter(model, s, 8))
    load_s = (time.perf_counter() - t0) / 32
    b = 32
    ids = torch.randint(1, 20000, (b, 32), device=device)

    def route(rows):  # type: ignore[no-untyped-def]
        return lambda: serving.set_routing(rows)

    def merge0() -> None:
        serving.set_routing([0] * b)
        serving.merge(0)
        serving.set_routing([0] * b)

    noop = lambda: None  # noqa: E731
    variants = {
        "base": (route([None] * b), noop),
        "k1_merged": (merge0, serving.unmerge),
        "k1_batched": (route([0] * b), noop),
        "k4": (route([i % 4 for i in range(b)]), noop),
        "k32": (route(list(range(b))), noop),
    }
    samples = {k: decoder(model, ids, args.steps) for k in variants}
    for k, (setup, teardown) in variants.items():  # warm up (allocator, kernels)
        setup()
        samples[k]()
        teardown()
    times = race(samples, variants, args.rounds)
    out = {
        "decode_ratio_k1": med_ratio(times, "base", "k1_merged"),
        "decode_ratio_k1_batched": med_ratio(times, "base", "k1_batched"),
        "decode_ratio_k4": med_ratio(times, "base", "k4"),
        "decode_ratio_k32": med_ratio(times, "base", "k32"),
        "base_decode_tok_s": round(b / statistics.median(times["base"]), 1),
        "k32_decode_tok_s": round(b / statistics.median(times["k32"]), 1),
        "adapter_load_ms": round(1000 * load_s, 2),
    }
    pids = torch.randint(1, 20000, (8, args.prefill_len), device=device)

    def prefill() -> float:
        with torch.inference_mode():
            sync()
            start = time.perf_counter()
            model(input_ids=pids, use_cache=False, logits_to_keep=1)
            sync()
            return time.perf_counter() - start

    pv = {"base": (route([None] * 8), noop), "k8": (route(list(range(8))), noop)}
    for setup, _ in pv.values():
        setup()
        prefill()
    ptimes = race({"base": prefill, "k8": prefill}, pv, args.rounds)
    out["prefill_ratio_k8"] = med_ratio(ptimes, "base", "k8")
    out["base_prefill_tok_s"] = round(8 * args.prefill_len / statistics.median(ptimes["base"]))
    serving.unwrap()
    return out


def verify(device: str, layers: int, policy: ServingPolicy) -> dict:
    """Mixed batch (ranks 4, 8, 16 and a base row) vs per-row reference weights, fp32."""
    model = smollm2(layers).to(device)
    ref = copy.deepcopy(model)
    bare = {k: v.clone() for k, v in ref.state_dict().items()}
    adapters = {0: adapter(model, 100, 4), 1: adapter(model, 101, 8), 2: adapter(model, 102, 16)}
    serving = ServingModel(model, max_slots=4, max_rank=64, policy=policy)
    for slot, mods in adapters.items():
        serving.load_modules(slot, mods)
    rows = [0, 1, 2, None, 1]
    ids = torch.randint(1, 20000, (len(rows), 24), device=device)
    worst = 0.0
    with torch.inference_mode():
        serving.set_routing(rows)
        got = model(input_ids=ids).logits.float()
        for i, slot in enumerate(rows):
            ref.load_state_dict(bare)
            if slot is not None:
                weights = reference_model_weights(ref, adapters[slot])
                ref.load_state_dict(weights, strict=False)
            want = ref(input_ids=ids[i : i + 1]).logits.float()
            err = (got[i] - want[0]).abs().max().item() / want.abs().max().item()
            worst = max(worst, err)
        # the adapters must matter: row 1 without its adapter is far from row 1 with it
        ref.load_state_dict(bare)
        plain = ref(input_ids=ids[1:2]).logits.float()
        effect = (got[1] - plain[0]).abs().max().item() / plain.abs().max().item()
    return {
        "verify_max_rel_err": worst,
        "verify_adapter_effect": effect,
        "verify_ok": bool(worst < 1e-3 and effect > 1e-2),
    }


def main() -> int:
    if "--engine" in sys.argv[1:]:
        from bench import gpu_engine

        return gpu_engine.main(sys.argv[1:])
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    args.layers = 2 if args.tiny else 30
    args.prefill_len = 64 if args.tiny else 512
    if args.tiny:
        args.rounds, args.steps = 2, 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    result: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "layers": args.layers,
    }
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for the check
    paths = {"default": ServingPolicy()}
    if device == "cuda":
        paths = {
            "triton": ServingPolicy(wide_max_rank=0),
            "torch": ServingPolicy(wide_max_rank=0, gpu_kernel=False),
        }
        dev = torch.device(device)
        result["triton_ok"] = {
            str(dt): triton_row_kernel(dev, dt) is not None
            for dt in (torch.bfloat16, torch.float32)
        }
    for path, policy in paths.items():
        result[f"verify_{path}"] = verify(device, 2 if args.tiny else 4, policy)
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            result[f"{name}_{path}"] = bench_dtype(dtype, device, args, policy)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
