"""The kernels one recorded decode step launches, counted on a machine without a GPU.

A decode step of a small model on a GPU costs about what its kernel launches cost (docs/
engine.md, "CUDA graphs"): the H200 replayed SmolLM2-135M's batch-32 step as 805 kernels
in 2.3 ms, most of them a few microseconds of elementwise work. How many kernels a
recorded step holds does not need the GPU to count: the CPU runs the same recorded
Python (`RecordedCapture` re-runs it on replay), the same torch operators and the same
Triton launchers (their kernels under Triton's interpreter). `count_replay` replays a
recorded graph once and counts, per decoder layer and outside the layers:

- every torch operator that launches a kernel on a GPU (a `TorchDispatchMode` sees each
  ATen operator below autograd; views and allocations launch none), by name;
- every Triton launch, by kernel name (`triton:<name>`); what the interpreter does inside
  a launch is not counted.

An operator counts as the one kernel it is on CUDA (`mm`: one cuBLAS GEMM, `addmm`: one
GEMM adding its input in the epilogue); a composite one (`linear`, `reshape`) as what it
decomposes into. What a kernel costs is the GPU's question; this is the count, which the
fused kernels and the sibling GEMMs exist to cut.

    python -m bench.step_census [--batch 32] [--out bench/results/step_census.json]

builds a decoder with SmolLM2-135M's widths (two layers, random weights: per-layer counts
do not depend on the depth) and `K = batch` random rank-8 FLoRA adapters on every
projection, records its decode graphs with the engine's fused kernels and the Triton
adapter kernels, and counts one base replay and one replay with every row on its own
adapter. `steps_kernels_30_layers` extrapolates to the 30-layer model (outside + 30 x a
layer).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "server"):  # the repo's `flora` and `flora_server`
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

NO_KERNEL = frozenset(
    {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach",
     "lift_fresh", "_local_scalar_dense", "promote_types", "resize_", "set_", "_unsafe_view"}
)  # fmt: skip
"""ATen operators that are not views and still launch no kernel (allocations, metadata)."""

FUSED_MODULE = "flora_server.engine.paged._fused_triton"
SMOLLM2_LAYERS = 30

Counts = collections.Counter[str]


class _Census(TorchDispatchMode):
    """Counts the kernels of the operators dispatched while it is on, in `where()`'s bin."""

    def __init__(self, where: Callable[[], Counts], inside_triton: Callable[[], bool]) -> None:
        super().__init__()
        self.where = where
        self.inside_triton = inside_triton

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            # Under inference mode a composite operator (matmul, linear, reshape) reaches
            # the mode whole: count what it is made of (reshape: a view or a copy).
            with self:
                return func.decompose(*args, **kwargs)
        name = func.overloadpacket.__name__
        if not self.inside_triton() and not func.is_view and name not in NO_KERNEL:
            self.where()[name] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def _triton_launches(count: Callable[[str], None]) -> Iterator[Callable[[], bool]]:
    """Every Triton launch (compiled or interpreted) reported to `count` by kernel name;
    yields whether a launch is running (its own torch calls are not the step's)."""
    from triton.runtime import interpreter, jit

    depth = [0]
    originals = {cls: cls.run for cls in (jit.JITFunction, interpreter.InterpretedFunction)}

    def counted(cls: Any) -> Callable[..., Any]:
        def run(self: Any, *args: Any, **kwargs: Any) -> Any:
            if not kwargs.get("warmup", False):
                count(self.fn.__name__)
            depth[0] += 1
            try:
                return originals[cls](self, *args, **kwargs)
            finally:
                depth[0] -= 1

        return run

    try:
        for cls in originals:
            cls.run = counted(cls)  # type: ignore[method-assign]
        yield lambda: depth[0] > 0
    finally:
        for cls, run in originals.items():
            cls.run = run  # type: ignore[method-assign]


def count_replay(layers: list[torch.nn.Module], replay: Callable[[], None]) -> dict[str, Any]:
    """The kernels of one `replay()`: ``layers`` (one Counter per decoder layer, in order)
    and ``outside`` (everything else: embedding, rotary tables, final norm, LM head)."""
    per_layer = [collections.Counter[str]() for _ in layers]
    outside: Counts = collections.Counter()
    current: list[Counts] = [outside]
    hooks = []

    def enter(counts: Counts) -> Callable[..., None]:
        return lambda *_: current.append(counts)  # a hook returning None changes nothing

    def leave(*_: Any) -> None:
        current.pop()

    for counts, layer in zip(per_layer, layers, strict=True):
        hooks.append(layer.register_forward_pre_hook(enter(counts)))
        hooks.append(layer.register_forward_hook(leave))
    try:
        with (
            _triton_launches(lambda name: current[-1].update([f"triton:{name}"])) as busy,
            torch.inference_mode(),
            _Census(lambda: current[-1], busy),
        ):
            replay()
    finally:
        for hook in hooks:
            hook.remove()
    return {"layers": [dict(sorted(c.items())) for c in per_layer], "outside": dict(outside)}


def _kernels(counts: dict[str, int]) -> int:
    return sum(counts.values())


def census(
    batch: int,
    rank: int = 8,
    layers: int = 2,
    targets: list[str] | None = None,
    sibling_gemms: bool = True,
) -> dict[str, Any]:
    """Record SmolLM2-shaped decode graphs at `batch` rows on the CPU and count one base
    replay and one with a distinct adapter on every row (adapters on `targets`, default
    every projection; `sibling_gemms`: the fused kernels' setting). The Triton kernel
    modules must import as the interpreter's (`TRITON_INTERPRET=1` before their first
    import: `main`)."""
    from bench.gpu_engine_setup import Sizes, build_model, make_adapters
    from flora.serving import ServingModel, ServingPolicy
    from flora.serving.backends import triton_gpu
    from flora_server.engine.paged.capture import RecordedCapture
    from flora_server.engine.paged.fused import FusedKernels
    from flora_server.engine.paged.graphs import GraphedPagedRunner
    from flora_server.engine.paged.runner import ChunkInput, KVTensors

    sizes = Sizes(layers=layers, adapters=batch, rank=rank, vocab=512)
    model = build_model(sizes)
    adapters = list(make_adapters(model, sizes, targets).values())
    row_kernel = triton_gpu.load_row_kernel()
    choose = triton_gpu.gpu_kernel_for
    triton_gpu.gpu_kernel_for = lambda enabled, *a: row_kernel if enabled else None  # type: ignore[assignment]
    try:
        serving = ServingModel(model, max_slots=batch, policy=ServingPolicy(cpu_kernel=False))
        for slot, adapter in enumerate(adapters):
            serving.load(slot, adapter)
    finally:
        triton_gpu.gpu_kernel_for = choose  # type: ignore[assignment]
    fused = FusedKernels(importlib.import_module(FUSED_MODULE))
    fused.sibling_gemms = sibling_gemms
    c = model.config
    blocks, block_size = batch + 1, 16
    kv = KVTensors(layers, blocks, block_size, c.num_key_value_heads,
                   c.hidden_size // c.num_attention_heads, torch.float32, "cpu")  # fmt: skip
    runner = GraphedPagedRunner(
        model, kv, serving, RecordedCapture(), scratch_block=batch, buckets=(batch,), fused=fused
    )
    tables = [[row] for row in range(batch)]
    prompt = [5, 7, 9]
    last = [len(prompt) * (row + 1) - 1 for row in range(batch)]  # each prompt's last token
    prefill = [ChunkInput(prompt, 0, t) for t in tables]
    runner.run(prefill, [None] * batch * len(prompt), last, serving.set_routing)
    result: dict[str, Any] = {"batch": batch, "rank": rank, "hidden": sizes.hidden}
    decoder = list(model.model.layers)
    for kind, slots in (("base", [None] * batch), ("adapters", list(range(batch)))):
        chunks = [ChunkInput([3], len(prompt), t) for t in tables]
        runner.run(chunks, list(slots), list(range(batch)), serving.set_routing)
        graph = next(g for g in runner.graphs.values() if g.adapters == (kind == "adapters"))
        counted = count_replay(decoder, graph.replay)
        layer = counted["layers"][-1]
        assert all(other == layer for other in counted["layers"]), "layers differ"
        result[kind] = {
            "layer": layer,
            "layer_kernels": _kernels(layer),
            "outside": counted["outside"],
            "steps_kernels_30_layers": _kernels(counted["outside"])
            + SMOLLM2_LAYERS * _kernels(layer),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--batch", type=int, default=32, help="decode rows (and adapters)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/step_census.json")
    args = parser.parse_args(argv)
    os.environ["TRITON_INTERPRET"] = "1"  # read when triton.jit decorates, at first import
    result = census(args.batch)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
