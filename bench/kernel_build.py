"""Every Triton kernel the server launches, compiled for an NVIDIA GPU on a machine without
one, and what the compiler made of it.

Triton's interpreter runs the kernels on the CPU for the tests, but it never runs Triton's
compiler: a kernel that the interpreter runs can still fail to compile for a GPU (a type
the backend rejects, a layout it cannot lower, a register budget blown), and that failure
would first show on a device, as a self-test failure that silently leaves the torch path
serving. Triton's compiler itself needs no GPU: given a target it lowers a kernel to PTX
and assembles it with the ``ptxas`` it ships. So ``compile_only(arch)`` makes every launch
through the server's own launchers (``TritonRowKernel``, ``FusedKernels``) a compilation
for ``arch`` instead: a stand-in driver reports the target, and each ``JITFunction.run``
becomes a warm-up (compile, do not launch). The launch cases (``launch_cases``) call the
launchers as a decode or prefill step of a real model shape does, so the kernels are
compiled with the argument types, alignments and constants they get when serving.

``resources`` reads the cubin with the CUDA tools Triton ships (``cuobjdump``,
``nvdisasm``): registers and local memory (spills) per thread, shared memory, and the
number of SASS instructions and global loads. Those are the static half of a kernel's
cost: spills and register pressure show here before a device run; time does not.

    python -m bench.kernel_build [--arch sm90] [--out bench/results/kernel_build_sm90.json]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "server"):  # the repo's `flora` and `flora_server`
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402

# compute capabilities by name: the A100, the L4 / L40S, the H100 / H200, the B200
ARCHES = {"sm80": 80, "sm89": 89, "sm90": 90, "sm100": 100}
FUSED_MODULE = "flora_server.engine.paged._fused_triton"


@dataclass(frozen=True)
class ModelShape:
    """The widths a decoder's kernels see."""

    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int


SHAPES = (
    ModelShape("SmolLM2-135M", 576, 9, 3, 64, 1536),
    ModelShape("Llama-3.1-8B", 4096, 32, 8, 128, 14336),
)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class Built(NamedTuple):
    kernel: str
    case: str
    compiled: Any  # triton.compiler.CompiledKernel


class _TargetDriver:
    """What ``JITFunction.run`` asks of Triton's active driver before a warm-up: a device,
    a stream, and the target to compile for."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        return self._target


@dataclass
class _Session:
    case: str = ""
    built: list[Built] = dataclasses.field(default_factory=list)


@contextlib.contextmanager
def compile_only(arch: str) -> Iterator[_Session]:
    """Inside: every Triton launch compiles its kernel for ``arch`` (a key of ``ARCHES``)
    and launches nothing; the session collects what was built, labelled with its
    ``case`` at the time. Outputs of the launchers are left as allocated. Not
    thread-safe: it swaps Triton's active driver and ``JITFunction.run`` for the process."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    session = _Session()
    run = JITFunction.run
    seen: list[JITFunction[Any]] = []

    def warm_up(self: JITFunction[Any], *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        if self not in seen:  # its binder and cache were made for another target
            seen.append(self)
            self.device_caches.clear()
        compiled = run(self, *args, grid=grid, warmup=True, **kwargs)
        session.built.append(Built(self.fn.__name__, session.case, compiled))
        return compiled

    previous = driver._active  # None until a driver was first asked for
    driver.set_active(_TargetDriver(GPUTarget("cuda", ARCHES[arch], 32)))
    JITFunction.run = warm_up  # type: ignore[method-assign]
    try:
        yield session
    finally:
        JITFunction.run = run  # type: ignore[method-assign]
        driver._active = previous
        for fn in seen:
            fn.device_caches.clear()


def kernel_modules() -> list[Any]:
    """The modules of the server's Triton kernels, compiled (not under the interpreter)."""
    from flora.serving.backends.triton_kernel import KERNEL_MODULES

    return [importlib.import_module(name) for name in (*KERNEL_MODULES, FUSED_MODULE)]


def launched_kernels() -> set[str]:
    """The kernels a launcher starts: the ``triton.jit`` functions of ``kernel_modules``
    that no other of them calls (those are helpers, compiled into their callers)."""
    from triton.runtime.jit import JITFunction

    jitted = {
        name: fn
        for module in kernel_modules()
        for name, fn in vars(module).items()
        if isinstance(fn, JITFunction) and fn.fn.__module__ == module.__name__
    }
    if not jitted:
        raise RuntimeError("the kernel modules are interpreted (TRITON_INTERPRET is set)")
    called = {
        name
        for name in jitted
        for other, fn in jitted.items()
        if other != name and re.search(rf"\b{name}\(", fn.src)
    }
    return set(jitted) - called


def launch_cases(
    shape: ModelShape, dtype: torch.dtype, batch: int = 32
) -> list[tuple[str, Callable[[], None]]]:
    """``(label, launch)`` for every kernel as a step of ``shape`` starts it: decode rows
    (``batch`` of them) for the adapter kernels' decode forms, the deltas inside the norm
    and SiLU-multiply, attention in one program a row and split; a 64-token prefill chunk
    per row for the tile kernels; attention with o's delta. Tensors are made when a case
    runs, on the CPU."""
    from flora.serving.backends.triton_gpu import ODelta
    from flora.serving.backends.triton_kernel import (
        Member,
        block_rank,
        load_row_kernel,
        member_arg,
    )
    from flora_server.engine.paged.fused import FusedKernels

    kernel = load_row_kernel()
    fused = FusedKernels(importlib.import_module(FUSED_MODULE))
    slots_n, rank, tokens = 8, 16, 64
    block_r = block_rank(rank)
    hidden, inter, hd = shape.hidden, shape.intermediate, shape.head_dim
    q_out, kv_out = shape.heads * hd, shape.kv_heads * hd

    def new(*size: int, kind: torch.dtype = dtype) -> torch.Tensor:
        return torch.zeros(size, dtype=kind)

    slots = new(batch, kind=torch.int32)
    x, weight, gate = new(batch, hidden), new(hidden), new(batch, inter)
    ranks = torch.full((slots_n,), rank, dtype=torch.int32)

    def member(n_in: int, n_out: int, biased: bool = False) -> Member:
        # a DeviceSlotBank's layout: A [S, in, R], B [S, R, out]
        a, b = new(slots_n, n_in, block_r), new(slots_n, block_r, n_out)
        return Member(new(batch, n_out), ranks, a, b, new(n_out) if biased else None)

    def qkv(biased: bool = False) -> list[Member]:
        return [member(hidden, out, biased) for out in (q_out, kv_out, kv_out)]

    def gate_up() -> list[Member]:
        return [member(hidden, inter), member(hidden, inter)]

    def norm_group(members: list[Member]) -> None:
        kernel.norm_decode_group(x, weight, 1e-5, new(batch, hidden), slots, members, block_r)

    def row(n_in: int, n_out: int, rows: int) -> None:
        _, _, a, b, _ = member(n_in, n_out)
        kernel(new(rows, n_out), new(rows, n_in), slots, ranks, a, b, block_r)

    def segments() -> None:
        _, _, a, b, _ = member(hidden, q_out)
        tiles = torch.tensor([[0, 16], [16, 64], [0, 1]], dtype=torch.int32)
        kernel.segments(new(tokens, q_out), new(tokens, hidden), tiles, ranks, a, b, block_r)

    def attention(splits: int, length: int, o_delta: bool = False) -> None:
        heads = new(batch, shape.heads, hd)
        pool = new(batch * length, shape.kv_heads, hd)
        read = torch.arange(batch * length).view(batch, length)
        lengths = torch.full((batch,), length, dtype=torch.int32)
        o = None
        if o_delta:  # o's delta from the attention output (`o_epilogue`)
            proj = member_arg(member(q_out, hidden))
            o = ODelta(slots, proj, new(batch, kind=torch.int32), block_r)
        fused.decode_attention(
            heads, pool, pool.clone(), read, lengths, torch.arange(batch), heads.clone(),
            hd**-0.5, splits, o,
        )  # fmt: skip

    def rope() -> None:  # transformers' layout: [B, H, T, D] views of [B, T, H, D]
        q = new(batch, 1, shape.heads, hd).transpose(1, 2)
        k = new(batch, 1, shape.kv_heads, hd).transpose(1, 2)
        fused.rope(q, k, new(batch, 1, hd), new(batch, 1, hd))

    def write_kv() -> None:
        pool = new(4 * batch, shape.kv_heads, hd)
        kv = new(batch, shape.kv_heads, hd)
        fused.write_kv(pool, pool.clone(), torch.arange(batch), kv, kv.clone())

    def act_down() -> None:
        kernel.act_decode(gate, gate, new(batch, inter), slots, member(inter, hidden), block_r)

    return [
        ("row_decode o", lambda: row(q_out, hidden, batch)),
        ("row_decode down", lambda: row(inter, hidden, batch)),
        ("row_update q, 64-token chunks", lambda: row(hidden, q_out, batch * tokens)),
        ("segment_update q", segments),
        ("row_decode_group q/k/v", lambda: kernel.decode_group(x, slots, qkv(), block_r)),
        ("row_decode_group gate/up", lambda: kernel.decode_group(x, slots, gate_up(), block_r)),
        ("norm_decode_group q/k/v", lambda: norm_group(qkv())),
        ("norm_decode_group q/k/v, biased", lambda: norm_group(qkv(biased=True))),
        ("norm_decode_group gate/up", lambda: norm_group(gate_up())),
        ("act_decode down", act_down),
        ("paged_decode, 256 keys a row", lambda: attention(1, 256)),
        ("paged_decode split 4, 2048 keys a row", lambda: attention(4, 2048)),
        ("paged_decode with o's delta", lambda: attention(1, 256, o_delta=True)),
        ("rope", rope),
        ("paged_write", write_kv),
        ("rms_norm", lambda: fused.rms_norm(x, weight, 1e-5)),
        ("silu_and_mul", lambda: fused.silu_mul(gate, gate)),
    ]


def _tool(name: str, *args: str) -> str:
    from triton import knobs

    path = getattr(knobs.nvidia, name).path
    return subprocess.run([path, *args], capture_output=True, text=True, check=True).stdout


_RESOURCE = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")
_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def resources(compiled: Any) -> dict[str, int]:
    """What the cubin of ``compiled`` uses per thread (registers, local memory: spills and
    stack), its shared memory, its SASS instruction count and its global loads."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = dict(_RESOURCE.findall(_tool("cuobjdump", "--dump-resource-usage", cubin.name)))
        opcodes = _INSTRUCTION.findall(_tool("nvdisasm", "-c", cubin.name))
    return {
        "registers": int(usage["REG"]),
        "local_bytes": int(usage["LOCAL"]) + int(usage["STACK"]),
        "shared_bytes": int(usage["SHARED"]),
        "num_warps": compiled.metadata.num_warps,
        "sass_instructions": len(opcodes),
        "global_loads": sum(op.startswith("LDG") for op in opcodes),
    }


def _cached(read: dict[str, dict[str, int]], compiled: Any) -> dict[str, int]:
    key = compiled.metadata.hash
    if key not in read:
        read[key] = resources(compiled)
    return read[key]


def build(
    arch: str, shapes: tuple[ModelShape, ...] = SHAPES, dtypes: tuple[torch.dtype, ...] = DTYPES
) -> list[dict[str, Any]]:
    """Every launch case of every shape and dtype compiled for ``arch``: one record per
    kernel launched (a split attention launches two), with its ``resources``."""
    records = []
    read: dict[str, dict[str, int]] = {}  # by the cubin's hash: cases share compilations
    with compile_only(arch) as session:
        for shape in shapes:
            for dtype in dtypes:
                for label, launch in launch_cases(shape, dtype):
                    session.case = label
                    start = len(session.built)
                    launch()
                    for built in session.built[start:]:
                        records.append(
                            {
                                "kernel": built.kernel,
                                "case": label,
                                "model": shape.name,
                                "dtype": str(dtype).removeprefix("torch."),
                                **_cached(read, built.compiled),
                            }
                        )
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHES), default="sm90")
    parser.add_argument("--out", type=Path, help="JSON to write (default: print only)")
    args = parser.parse_args(argv)
    records = build(args.arch)
    missing = launched_kernels() - {r["kernel"] for r in records}
    header = f"{'kernel':<22} {'case':<38} {'model':<13} {'dtype':<9} regs local  sass  ldg"
    print(header)
    for r in records:
        print(
            f"{r['kernel']:<22} {r['case']:<38} {r['model']:<13} {r['dtype']:<9} "
            f"{r['registers']:>4} {r['local_bytes']:>5} {r['sass_instructions']:>5} "
            f"{r['global_loads']:>4}"
        )
    if args.out:
        import triton

        report = {"arch": args.arch, "triton": triton.__version__, "kernels": records}
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    if missing:
        print(f"not compiled by any case: {sorted(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
