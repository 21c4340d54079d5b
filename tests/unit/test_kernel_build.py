"""The server's Triton kernels compile for the H100 / H200 (sm_90), on this CPU machine,
through the launchers that serve them (``bench/kernel_build.py``): Triton's interpreter,
which runs them in the other tests, never runs Triton's compiler."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

import triton
import triton.language as tl

from bench import kernel_build

LAUNCHED = {
    "row_update", "row_decode", "row_decode_group", "segment_update",  # adapter deltas
    "norm_decode_group", "act_decode",  # deltas inside the norm and SiLU-multiply
    "paged_decode", "paged_decode_combine", "paged_write", "rms_norm", "rope", "silu_and_mul",
}  # fmt: skip


@pytest.fixture(autouse=True)
def _triton_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compiled kernels go to a temporary cache, not the user's ``~/.triton``."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "triton"))


def test_launched_kernels_are_the_modules_kernels_without_their_helpers() -> None:
    # rms_rstd, rms_normed, silu_mul, _shrink, _expand... are compiled into their callers
    assert kernel_build.launched_kernels() == LAUNCHED


@pytest.mark.parametrize("dtype", kernel_build.DTYPES, ids=str)
def test_every_launched_kernel_compiles_for_sm90_without_spilling(dtype: torch.dtype) -> None:
    records = kernel_build.build("sm90", dtypes=(dtype,))
    assert {r["kernel"] for r in records} == LAUNCHED
    # every case of every model shape launched what it names (a split launches two)
    cases = len(kernel_build.launch_cases(kernel_build.SHAPES[0], dtype))
    assert len(records) == len(kernel_build.SHAPES) * (cases + 1)
    spilled = [(r["kernel"], r["case"], r["model"]) for r in records if r["local_bytes"]]
    assert spilled == []  # a decode kernel that spills waits on local memory every step
    for r in records:
        assert 0 < r["registers"] <= 255 and r["sass_instructions"] > 0
    # the adapter kernels' decode forms read their factors from global memory
    assert all(r["global_loads"] > 0 for r in records if "decode" in r["kernel"])


@triton.jit
def _loop_changes_type(x, n):  # pragma: no cover (compiled)
    acc = 0  # an int32 before the loop, a float32 in it: the compiler refuses it
    for i in range(n):
        acc = acc + tl.load(x + i)
    tl.store(x, acc)


def test_compile_only_raises_the_compilers_error_and_restores_triton() -> None:
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    run, active = JITFunction.run, driver._active
    with (
        kernel_build.compile_only("sm90") as session,
        pytest.raises(triton.CompilationError, match="acc"),
    ):
        _loop_changes_type[(1,)](torch.ones(4), 4)
    assert session.built == []
    assert JITFunction.run is run and driver._active is active


def test_os_delta_in_attention_orders_its_parts_before_its_count() -> None:
    """What the interpreter, running programs one after another, cannot show: the count
    of o's delta in decode attention is an acquire-release atomic at GPU scope after a CTA
    barrier (every thread's part stored before it), and the last program reads the parts
    past L1 (``.cg``)."""
    import re

    with kernel_build.compile_only("sm90") as session:
        cases = dict(kernel_build.launch_cases(kernel_build.SHAPES[0], torch.bfloat16))
        cases["paged_decode with o's delta"]()
    ptx = session.built[0].compiled.asm["ptx"]
    count = ptx.index("atom.global.gpu.acq_rel.add")
    assert "bar.sync" in ptx[:count]
    assert "atom.global.gpu.acq_rel.exch" in ptx[count:]  # the count reset for the next
    assert re.search(r"ld\.global\.cg", ptx[count:])
