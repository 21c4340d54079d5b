"""Microbenchmark of flora.serving's per-row kernels, side by side in one run.

Decode-shaped work like SmolLM2-135M: batch 32, one token, hidden 576, intermediate 1536,
the 7 llama projections (q, k, v, o, gate, up, down) x a few layers, rank-8 adapters on all
of them, K = 1, 4, 32 distinct adapters in the batch. Methods:

- base:   the plain model (no adapters);
- naive:  per projection and step, gather every row's factors then bmm (A[slot_of_row]);
- wide / rows: flora.serving with that torch kernel forced (``cpu_kernel=False``);
- auto: the default ServingPolicy (on a float32 CPU: the fused row kernel of
  ``flora.serving.backends.numba_cpu``; on CUDA: "rows");
- merged: K = 1 only, the adapter folded into the weights.

Also a conv section (EfficientNet-like depthwise + pointwise convs, batch 8): segments vs
rows, routing built per batch (vision requests are one forward each).

And a packed-step section (engine v2's ragged step): one prefill chunk of ``--prefill``
tokens plus ``--decode`` decode tokens over ``--segment-adapters`` adapters in one forward
``[1, T]``, adapters applied per token segment (``Segments``, SGMV: the chunk one segment,
each decode token one) against the per-token row path (the same tokens laid out ``[T, 1]``,
a row per token, each token's factors read as a row of its own); the routing is built once
per step, as the engine does. ``--only-segments`` runs only this section; ``--threads 1``
times it on one thread (on a loaded machine, multi-threaded ops each wait for a time slice
per thread, which swamps the difference being measured).

Prints time per step and the ratio base_time / method_time (1.0 = free). Methods are
interleaved round-robin in short samples and the fastest sample of each kept, because the
machines are shared and noisy (interference only ever adds time).

    .venv/bin/python bench/kernels.py [--device cuda] [--layers 4] [--reps 7] [--only-segments]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from flora.serving import ModuleFactors, Segments, ServingModel, ServingPolicy

HIDDEN, INTER, KV = 576, 1536, 192
PROJ = {
    "q": (HIDDEN, HIDDEN),
    "k": (HIDDEN, KV),
    "v": (HIDDEN, KV),
    "o": (HIDDEN, HIDDEN),
    "gate": (HIDDEN, INTER),
    "up": (HIDDEN, INTER),
    "down": (INTER, HIDDEN),
}


class Block(nn.Module):
    """The 7 projections of a llama layer, wired so every one of them runs per step."""

    def __init__(self) -> None:
        super().__init__()
        for name, (n_in, n_out) in PROJ.items():
            setattr(self, name, nn.Linear(n_in, n_out, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        h = x + self.o(q + 0.1 * (k.sum(-1, keepdim=True) + v.sum(-1, keepdim=True)))
        return h + self.down(F.silu(self.gate(h)) * self.up(h))


class Stack(nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x) * 0.5
        return x


def adapter(layers: int, rank: int, gen: torch.Generator) -> dict[str, ModuleFactors]:
    out = {}
    for i in range(layers):
        for name, (n_in, n_out) in PROJ.items():
            factors = (
                torch.randn(n_out, rank, generator=gen) * 0.02,
                torch.randn(n_in, rank, generator=gen) * 0.02,
            )
            out[f"layers.{i}.{name}"] = ModuleFactors(
                "linear", torch.randn(rank, rank, generator=gen), factors, 1.0
            )
    return out


class NaiveLinear(nn.Module):
    """Gather-then-bmm per row, every step (what DESIGN.md measured at 0.76x for K=32)."""

    def __init__(
        self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor
    ) -> None:
        super().__init__()
        self.base, self.a, self.b, self.slots = base, a, b, slots

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.a[self.slots], self.b[self.slots]  # [B, in, r], [B, r, out]: copies
        return self.base(x) + torch.bmm(torch.bmm(x, a), b)


def naive_model(
    base: Stack, adapters: list[dict[str, ModuleFactors]], slots: torch.Tensor
) -> Stack:
    from flora.serving import fold_two_mode

    model = copy.deepcopy(base)
    for name in adapters[0]:
        folded = [fold_two_mode(a[name]) for a in adapters]
        dtype = base.layers[0].q.weight.dtype
        a = torch.stack([f[0] for f in folded]).to(slots.device, dtype)
        b = torch.stack([f[1] for f in folded]).to(slots.device, dtype)
        parent, _, child = name.rpartition(".")
        lin = model.get_submodule(name)
        setattr(model.get_submodule(parent), child, NaiveLinear(lin, a, b, slots))
    return model


def served(
    base: nn.Module,
    adapters: list[dict[str, ModuleFactors]],
    rows: list[int],
    policy: ServingPolicy | None,
    merge: bool = False,
) -> ServingModel:
    serving = ServingModel(copy.deepcopy(base), max_slots=len(adapters), max_rank=64, policy=policy)
    for slot, modules in enumerate(adapters):
        serving.load_modules(slot, modules)
    if merge:
        serving.merge(rows[0])
    serving.set_routing(rows)
    return serving


def bind(model: Callable[[torch.Tensor], object], x: torch.Tensor) -> Callable[[], object]:
    return lambda: model(x)


def graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """Capture one call of ``fn`` in a CUDA graph (plans are static per routing, so a
    decode step replays with no Python or launch overhead) and return its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], steps: int, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


def race(
    methods: dict[str, Callable[[], object]], steps: int, reps: int, device: torch.device
) -> dict[str, float]:
    for fn in methods.values():  # warm up
        fn()
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(reps):
        for name, fn in methods.items():
            times[name].append(timeit(fn, steps, device))
    # Noise on a shared machine only adds time: the fastest sample is the best estimate.
    return {m: min(t) for m, t in times.items()}


def bench_linear(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(0)
    base = Stack(args.layers).to(device=device, dtype=dtype).eval()
    adapters = [adapter(args.layers, args.rank, gen) for _ in range(max(args.ks))]
    x = torch.randn(args.batch, 1, HIDDEN, device=device, dtype=dtype)
    results = {}
    for k in args.ks:
        rows = [i % k for i in range(args.batch)]
        used = adapters[:k]
        slots = torch.tensor(rows, device=device)
        fns: dict[str, Callable[[], object]] = {
            "base": bind(base, x),
            "naive": bind(naive_model(base, used, slots), x),
            "wide": bind(
                served(base, used, rows, ServingPolicy(wide_max_rank=10**6, cpu_kernel=False)), x
            ),
            "rows": bind(
                served(base, used, rows, ServingPolicy(wide_max_rank=0, cpu_kernel=False)), x
            ),
            "auto": bind(served(base, used, rows, None), x),
        }
        if k == 1:
            fns["merged"] = bind(served(base, used, rows, None, merge=True), x)
        if args.cuda_graphs:
            with torch.inference_mode():
                fns = {m: graphed(fn) for m, fn in fns.items()}
        with torch.inference_mode():
            t = race(fns, args.steps, args.reps, device)
        results[f"K={k}"] = {m: {"ms": 1e3 * v, "ratio": t["base"] / v} for m, v in t.items()}
        line = "  ".join(f"{m} {t['base'] / v:5.3f}" for m, v in t.items() if m != "base")
        print(
            f"linear K={k:<3} base {1e3 * t['base']:7.2f} ms/step | ratio vs base: {line}",
            flush=True,
        )
    return results


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
        self.pw = nn.Conv2d(32, 64, 1)
        self.dw2 = nn.Conv2d(64, 64, 3, padding=1, stride=2, groups=64, bias=False)
        self.pw2 = nn.Conv2d(64, 32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw2(self.dw2(F.relu(self.pw(self.dw(x)))))


def conv_adapter(net: ConvNet, gen: torch.Generator) -> dict[str, ModuleFactors]:
    out = {}
    for name, m in net.named_children():
        shape = tuple(m.weight.shape)
        ranks = tuple(min(d, 8) for d in shape[:2]) + tuple(shape[2:])
        factors = tuple(
            torch.randn(d, r, generator=gen) * 0.1 for d, r in zip(shape, ranks, strict=True)
        )
        out[name] = ModuleFactors("conv2d", torch.randn(ranks, generator=gen), factors, 1.0)
    return out


def bench_conv(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(1)
    base = ConvNet().to(device=device, dtype=dtype).eval()
    batch = 8
    adapters = [conv_adapter(base, gen) for _ in range(batch)]
    x = torch.randn(batch, 32, 56, 56, device=device, dtype=dtype)
    results = {}
    for k in (1, 4, 8):
        rows = [i % k for i in range(batch)]

        def per_batch(serving: ServingModel, rows: list[int] = rows) -> Callable[[], object]:
            def run() -> object:
                serving._plan_cache.clear()  # vision: a new routing per request batch
                serving.set_routing(rows)
                return serving(x)

            return run

        fns = {
            "base": lambda: base(x),
            "segments": per_batch(
                served(base, adapters[:k], rows, ServingPolicy(conv_segments_max=10**6))
            ),
            "rows": per_batch(served(base, adapters[:k], rows, ServingPolicy(conv_segments_max=0))),
        }
        with torch.inference_mode():
            t = race(fns, max(1, args.steps // 4), args.reps, device)
        results[f"K={k}"] = {m: {"ms": 1e3 * v, "ratio": t["base"] / v} for m, v in t.items()}
        line = "  ".join(f"{m} {t['base'] / v:5.3f}" for m, v in t.items() if m != "base")
        print(
            f"conv   K={k:<3} base {1e3 * t['base']:7.2f} ms/batch | ratio vs base: {line}",
            flush=True,
        )
    return results


def bench_segments(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """A packed step: segment routing vs per-token row routing on one served model, with
    the plans built every step (as the engine's steps change shape) and cached."""
    gen = torch.Generator().manual_seed(0)
    base = Stack(args.layers).to(device=device, dtype=dtype).eval()
    k = args.segment_adapters
    adapters = [adapter(args.layers, args.rank, gen) for _ in range(k)]
    lengths = [args.prefill] + [1] * args.decode
    slots = [0] + [(i + 1) % k for i in range(args.decode)]  # every adapter used
    segments = Segments.from_lengths(lengths, slots)
    tokens = segments.token_slots()
    x = torch.randn(1, segments.total, HIDDEN, device=device, dtype=dtype)
    x_rows = x.reshape(-1, 1, HIDDEN)  # the same tokens, a row each

    def model(cache: int) -> ServingModel:
        serving = ServingModel(
            copy.deepcopy(base), max_slots=k, max_rank=64, routing_cache_size=cache
        )
        for slot, modules in enumerate(adapters):
            serving.load_modules(slot, modules)
        return serving

    def routed(
        serving: ServingModel, routing: Segments | list[int], inp: torch.Tensor
    ) -> Callable[[], object]:
        def step() -> object:
            serving.set_routing(routing)
            return serving(inp)

        return step

    planned, cached = model(0), model(2)  # 0: every set_routing builds the plans
    if args.threads:  # explicit and after the models (numba's pool start can change it)
        torch.set_num_threads(args.threads)
    fns: dict[str, Callable[[], object]] = {
        "base": bind(base, x),
        "segments": routed(planned, segments, x),
        "tokens": routed(planned, tokens, x_rows),
        "segments_cached": routed(cached, segments, x),
        "tokens_cached": routed(cached, tokens, x_rows),
    }
    with torch.inference_mode():
        torch.testing.assert_close(
            fns["segments"]().reshape(-1), fns["tokens"]().reshape(-1), rtol=1e-3, atol=1e-3
        )
        t = race(fns, args.steps, args.reps, device)
    res: dict[str, object] = {m: {"ms": 1e3 * v, "ratio": t["base"] / v} for m, v in t.items()}
    # > 1: the segment path is faster than the per-token row path
    res["tokens_over_segments"] = t["tokens"] / t["segments"]
    res["tokens_over_segments_cached"] = t["tokens_cached"] / t["segments_cached"]
    # the adapters' own cost (time over base), cached plans: noisier, but what SGMV changes
    over_base = (t["tokens_cached"] - t["base"], t["segments_cached"] - t["base"])
    res["adapter_ms_cached"] = {"tokens": 1e3 * over_base[0], "segments": 1e3 * over_base[1]}
    print(
        f"packed step: prefill {args.prefill} + decode {args.decode} tokens, {k} adapters, "
        f"threads {torch.get_num_threads()}, "
        f"base {1e3 * t['base']:7.2f} ms | ratio vs base (plans built per step / cached): "
        f"segments {t['base'] / t['segments']:5.3f} / {t['base'] / t['segments_cached']:5.3f}  "
        f"tokens {t['base'] / t['tokens']:5.3f} / {t['base'] / t['tokens_cached']:5.3f} | "
        f"per-token time / segment time {t['tokens'] / t['segments']:5.2f}x / "
        f"{t['tokens_cached'] / t['segments_cached']:5.2f}x | adapter time over base "
        f"(cached): tokens {1e3 * over_base[0]:.2f} ms, segments {1e3 * over_base[1]:.2f} ms",
        flush=True,
    )
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 4, 32])
    p.add_argument("--steps", type=int, default=3, help="steps per timed sample")
    p.add_argument("--reps", type=int, default=25, help="samples per method")
    p.add_argument("--no-conv", action="store_true")
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="time CUDA-graph replays of each decode step (linear section)",
    )
    p.add_argument("--prefill", type=int, default=512, help="packed step: prefill tokens")
    p.add_argument("--decode", type=int, default=31, help="packed step: decode tokens")
    p.add_argument("--segment-adapters", type=int, default=8, help="packed step: adapters")
    p.add_argument("--only-segments", action="store_true", help="run only the packed-step section")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="packed step: intra-op threads (0: as configured); 1 is steadier on a loaded machine",
    )
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(
        f"device {name}, {args.dtype}, threads {torch.get_num_threads()}, "
        f"layers {args.layers}, batch {args.batch}, rank {args.rank}"
    )
    res = {
        "device": name,
        "dtype": args.dtype,
        "layers": args.layers,
        "batch": args.batch,
        "rank": args.rank,
    }
    if not args.only_segments:
        res["linear"] = bench_linear(args, device, dtype)
        if not args.no_conv:
            res["conv"] = bench_conv(args, device, dtype)
    res["segments"] = bench_segments(args, device, dtype)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
