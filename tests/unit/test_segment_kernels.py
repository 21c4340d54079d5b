"""Segment routing (SGMV): ``Segments`` validation, each backend's segment kernel against
the float64 definition (``segment_delta``), and served modules routed by segments against
an independent per-row reference and against the same model routed per token. The Triton
kernel runs under Triton's interpreter on the CPU (on a CUDA machine, compiled)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from flora.serving import ModuleFactors, ServingModel, ServingPolicy, reference_forward
from flora.serving.backends import triton_gpu as gk
from flora.serving.backends.numba_cpu import row_kernel
from flora.serving.segments import Segments, segment_delta
from tests.unit.triton_modules import triton_modules

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# A packed step's shape in miniature: a long prefill chunk, decode tokens, a base row, an
# empty segment, a short chunk, a long base chunk, a second long chunk of a slot already
# used (two segments of one slot), a slot of rank 0 for some modules.
LENGTHS = [37, 1, 1, 0, 1, 5, 20, 17, 1, 3]
SLOTS = [0, 1, -1, 2, 2, 1, -1, 1, 0, 3]


@pytest.fixture(scope="module")
def numba_kernel():  # type: ignore[no-untyped-def]
    k = row_kernel()
    assert k is not None, "numba is a dependency: the kernel must be available here"
    return k


@pytest.fixture
def triton_kernel(monkeypatch):  # type: ignore[no-untyped-def]
    """As tests/unit/test_gpu_kernel.py: compiled on CUDA, else the interpreter."""
    with triton_modules(monkeypatch, DEVICE):
        yield gk.load_row_kernel()


# -- Segments ----------------------------------------------------------------------------


def test_segments_describe_the_tokens() -> None:
    seg = Segments.from_lengths([2, 0, 1, 3], [4, None, -1, 4])
    assert seg.starts == (0, 2, 2, 3) and seg.slots == (4, -1, -1, 4) and seg.total == 6
    assert seg.token_slots() == [4, 4, -1, 4, 4, 4]
    assert seg.live_slots() == [4]
    assert seg.uniform_slot() is None
    assert Segments.from_lengths([3, 0], [1, 2]).uniform_slot() == 1  # empty: unused
    assert Segments.from_lengths([5, 1], [2, 0]).pieces(2) == [
        (0, 2, 2),
        (2, 4, 2),
        (4, 5, 2),
        (5, 6, 0),
    ]


@pytest.mark.parametrize(
    ("starts", "lengths", "slots", "message"),
    [
        ((), (), (), "at least one segment"),
        ((0, 2), (2,), (0, 1), "one of each per segment"),
        ((0,), (-1,), (0,), "length -1"),
        ((1,), (2,), (0,), "starts at 1, expected 0"),
        ((0, 3), (2, 1), (0, 1), "starts at 3, expected 2"),  # a gap
        ((0, 1), (2, 1), (0, 1), "starts at 1, expected 2"),  # an overlap
        ((0,), (2,), (-2,), "slot -2"),
        ((0,), (2.0,), (0,), "not an int"),
        ((0,), (2,), (True,), "not an int"),
    ],
)
def test_invalid_segments_are_refused_where_built(starts, lengths, slots, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises((ValueError, TypeError), match=message):
        Segments(starts, lengths, slots)


# -- the kernels against the definition --------------------------------------------------


def bank(gen, n_in: int, n_out: int, ranks: list[int]):  # type: ignore[no-untyped-def]
    """``A: [S, in, R]`` (stored rank-major, as the CPU kernel reads it) and ``B: [S, R,
    out]``, NaN beyond each slot's rank: reading past a rank would show."""
    cap = max(ranks)
    at = torch.randn(len(ranks), cap, n_in, generator=gen)
    b = torch.randn(len(ranks), cap, n_out, generator=gen)
    for s, r in enumerate(ranks):
        at[s, r:] = float("nan")
        b[s, r:] = float("nan")
    return at.transpose(1, 2), b


@pytest.mark.parametrize("members", [1, 3])
@pytest.mark.parametrize("factors", [torch.float32, torch.bfloat16])
def test_numba_segment_kernel_matches_the_definition(numba_kernel, members, factors) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(members)
    seg = Segments.from_lengths(LENGTHS, SLOTS)
    rank_sets = [[8, 3, 5, 1], [2, 0, 4, 7], [16, 5, 0, 0]][:members]  # 0: not targeted
    widths = [53, 11, 29][:members]
    banks = [bank(gen, 37, n, r) for n, r in zip(widths, rank_sets, strict=True)]
    banks = [(a.to(factors), b.to(factors)) for a, b in banks]
    x = torch.randn(seg.total, 37, generator=gen)
    # every token but those of the segment of 20 base tokens: those rows must stay as they are
    items = [p for p in seg.pieces(4) if p[0] < 45 or p[0] >= 65]
    items_np = np.ascontiguousarray(np.asarray(items, dtype=np.int32).T)
    ds = tuple(torch.full((seg.total, n), float("nan")) for n in widths)
    numba_kernel.segments(
        x,
        items_np,
        tuple(_bits(a.transpose(1, 2)) for a, _ in banks),
        tuple(_bits(b) for _, b in banks),
        tuple(np.asarray(r, dtype=np.int32) for r in rank_sets),
        ds,
    )
    covered = torch.zeros(seg.total, dtype=torch.bool)
    for lo, hi, _ in items:
        covered[lo:hi] = True
    for d, (a, b), ranks in zip(ds, banks, rank_sets, strict=True):
        want = segment_delta(x, seg, a.float(), b.float(), ranks)
        torch.testing.assert_close(d[covered].double(), want[covered], rtol=1e-5, atol=1e-4)
        assert d[~covered].isnan().all()  # untouched


def _bits(t: torch.Tensor) -> np.ndarray:
    t = t.contiguous()
    return (t if t.dtype == torch.float32 else t.view(torch.int16)).numpy()


INTERPRETER_BF16 = pytest.mark.skipif(
    DEVICE.type == "cpu",
    reason="Triton's interpreter mishandles bfloat16 (the row kernel's results too); "
    "compiled on CUDA it is tested",
)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=INTERPRETER_BF16)]
)
def test_triton_segment_kernel_matches_the_definition(triton_kernel, dtype) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(3)
    seg = Segments.from_lengths(LENGTHS, SLOTS)
    ranks = [8, 19, 0, 1]  # 19: the 32-wide rank tile; slot 2 not loaded here
    a, b = (t.to(DEVICE, dtype) for t in bank(gen, 100, 70, ranks))  # odd widths
    x = torch.randn(seg.total, 100, generator=gen).to(DEVICE, dtype)
    y0 = torch.randn(seg.total, 70, generator=gen).to(DEVICE, dtype)
    y = y0.clone()
    tiles = gk.segment_tiles(seg, ranks, triton_kernel.block_t)
    assert len(tiles[0]) == 3 + 1 + 1 + 2 + 1 + 1  # 37, 1, 5, 17, 1, 3 tokens (base/rank 0: none)
    as_int = lambda v: torch.tensor(v, dtype=torch.int32, device=DEVICE)  # noqa: E731
    triton_kernel.segments(y, x, as_int(tiles), as_int(ranks), a, b, gk.block_rank(max(ranks)))
    want = y0.double() + segment_delta(x, seg, a, b, ranks)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), want.to(dtype).double(), rtol=tol, atol=tol * 50)
    untouched = torch.tensor([ranks[s] == 0 if s >= 0 else True for s in seg.token_slots()])
    assert torch.equal(y[untouched.to(DEVICE)], y0[untouched.to(DEVICE)])  # bit for bit


def test_the_triton_self_test_checks_the_segment_form(triton_kernel) -> None:  # type: ignore[no-untyped-def]
    gk.self_test(triton_kernel, DEVICE, torch.float32)

    class SkipsSegments(gk.TritonRowKernel):  # the row form right, the segment form a no-op
        def segments(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            pass

    with pytest.raises(AssertionError):
        gk.self_test(SkipsSegments(triton_kernel._k), DEVICE, torch.float32)


# -- served modules ----------------------------------------------------------------------


class Block(torch.nn.Module):
    """An embedding and three sibling projections that read its output (q/k/v share)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 24)
        self.q_proj = torch.nn.Linear(24, 40)
        self.k_proj = torch.nn.Linear(24, 16, bias=False)
        self.v_proj = torch.nn.Linear(24, 16)

    def forward(self, ids: torch.Tensor) -> list[torch.Tensor]:
        h = self.embed(ids)
        return [h, self.q_proj(h), self.k_proj(h), self.v_proj(h)]


def adapter(targets: dict[str, int], seed: int) -> dict[str, ModuleFactors]:
    """FLoRA factors (core and both factors random) for ``targets``: name -> rank."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"embed": (50, 24), "q_proj": (40, 24), "k_proj": (16, 24), "v_proj": (16, 24)}
    out = {}
    for name, r in targets.items():
        d0, d1 = shapes[name]
        kind = "embedding" if name == "embed" else "linear"
        core = torch.randn(r, r, generator=gen)
        factors = (torch.randn(d0, r, generator=gen) * 0.3, torch.randn(d1, r, generator=gen) * 0.3)
        out[name] = ModuleFactors(kind, core, factors, 0.5)
    return out


ADAPTERS = [  # different targets and ranks: each module sees some slots at rank 0
    adapter({"embed": 4, "q_proj": 4, "k_proj": 4, "v_proj": 4}, seed=0),
    adapter({"q_proj": 8, "v_proj": 8}, seed=1),
    adapter({"k_proj": 2}, seed=2),
    adapter({"embed": 3, "q_proj": 6}, seed=3),
]


def served_block(  # type: ignore[no-untyped-def]
    policy: ServingPolicy, dtype: torch.dtype = torch.float32, device: str = "cpu"
):
    """The served block on `device` and its float32 reference on the CPU."""
    torch.manual_seed(0)
    base = Block()
    ref = copy.deepcopy(base)
    serving = ServingModel(base.to(device), max_slots=4, policy=policy, dtype=dtype)
    for slot, mods in enumerate(ADAPTERS):
        serving.load_modules(slot, mods)
    return serving, ref


def reference_outputs(ref: Block, ids: torch.Tensor, token_slots: list[int]) -> list[torch.Tensor]:
    """Each token alone through ``W + dW`` of its slot (``flora.serving.reference``)."""
    rows = ids.reshape(-1, 1)  # a row per token
    slots = {
        name: {k: a[name] for k, a in enumerate(ADAPTERS) if name in a}
        for name in ("embed", "q_proj", "k_proj", "v_proj")
    }
    h = reference_forward(ref.embed, rows, token_slots, slots["embed"])
    outs = [h] + [
        reference_forward(getattr(ref, n), h, token_slots, slots[n])
        for n in ("q_proj", "k_proj", "v_proj")
    ]
    return [o.reshape(1, ids.shape[1], -1) for o in outs]


POLICIES = {
    "numba": ServingPolicy(),
    "torch": ServingPolicy(cpu_kernel=False, gpu_kernel=False),
    "triton": ServingPolicy(cpu_kernel=False),
}
PLAN_NAMES = {
    "numba": "SegmentKernelPlan",
    "torch": "_SegmentGroupsPlan",
    "triton": "_TritonSegmentPlan",
}


@pytest.fixture(params=sorted(POLICIES))
def backend(request, monkeypatch) -> str:  # type: ignore[no-untyped-def]
    if request.param == "triton":  # the interpreter's kernel, as the CUDA backend would load it
        kernel = request.getfixturevalue("triton_kernel")
        monkeypatch.setattr(gk, "gpu_kernel_for", lambda enabled, *a: kernel if enabled else None)
    name: str = request.param
    return name


def device_of(backend: str) -> str:
    """Where a backend's served block runs: Triton on the test device (compiled on CUDA,
    interpreted on the CPU), the others on the CPU."""
    return DEVICE.type if backend == "triton" else "cpu"


def test_served_modules_routed_by_segments_match_each_token_alone(backend: str) -> None:
    device = device_of(backend)
    serving, ref = served_block(POLICIES[backend], device=device)
    seg = Segments.from_lengths(LENGTHS, SLOTS)
    ids = torch.randint(0, 50, (1, seg.total), generator=torch.Generator().manual_seed(5))
    serving.set_routing(seg)
    kinds = {type(p).__name__ for p in serving.routing.plans if p is not None}
    assert PLAN_NAMES[backend] in kinds
    with torch.no_grad():
        got = [g.cpu() for g in serving(ids.to(device))]
    want = reference_outputs(ref, ids, seg.token_slots())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    if backend == "numba":  # q/k/v: one shared kernel call per input
        plans = dict(zip(serving.wrapped_modules(), serving.routing.plans, strict=True))
        shared = plans["q_proj"].deltas
        assert shared is not None and plans["k_proj"].deltas is shared is plans["v_proj"].deltas
        h = got[0].detach().requires_grad_()  # autograd: the torch form serves
        q = serving.model.q_proj(h)
        q.sum().backward()
        assert h.grad is not None and plans["q_proj"].torch_path is not None
        torch.testing.assert_close(q.detach(), want[1], rtol=1e-5, atol=1e-5)
    # the per-token row path on the same model: the layout engine v2 used before segments
    serving.set_routing(seg.token_slots())
    with torch.no_grad():
        rows = serving(ids.reshape(-1, 1).to(device))
    for g, r in zip(got, rows, strict=True):
        torch.testing.assert_close(g, r.cpu().reshape(g.shape), rtol=1e-5, atol=1e-5)


def test_bfloat16_segments_match_the_float32_reference(backend: str) -> None:
    if backend == "numba":  # float32 only: a bfloat16 model takes the torch backend
        pytest.skip("the numba kernel serves float32 modules")
    if backend == "triton" and DEVICE.type == "cpu":
        pytest.skip("Triton's interpreter mishandles bfloat16; compiled on CUDA it is tested")
    device = device_of(backend)
    serving, ref = served_block(POLICIES[backend], dtype=torch.bfloat16, device=device)
    seg = Segments.from_lengths(LENGTHS, SLOTS)
    ids = torch.randint(0, 50, (1, seg.total), generator=torch.Generator().manual_seed(6))
    serving.set_routing(seg)
    with torch.no_grad():
        got = [g.cpu() for g in serving(ids.to(device))]
    want = reference_outputs(ref, ids, seg.token_slots())  # the float32 model
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w, rtol=3e-2, atol=6e-2)


def test_bfloat16_factor_storage_segments_match_the_row_path() -> None:
    """The numba backend with factors stored as bfloat16 (the kernel widens the bits, the
    long segments' GEMMs a widened copy): the same rounded factors as the per-token path,
    so the two agree to float32 rounding; both stay near the float32 reference."""
    policy = dataclasses.replace(POLICIES["numba"], factor_dtype=torch.bfloat16)
    serving, ref = served_block(policy)
    seg = Segments.from_lengths(LENGTHS, SLOTS)
    ids = torch.randint(0, 50, (1, seg.total), generator=torch.Generator().manual_seed(9))
    serving.set_routing(seg)
    assert "SegmentKernelPlan" in {type(p).__name__ for p in serving.routing.plans}
    with torch.no_grad():
        got = serving(ids)
        serving.set_routing(seg.token_slots())
        rows = serving(ids.reshape(-1, 1))
    want = reference_outputs(ref, ids, seg.token_slots())
    for g, r, w in zip(got, rows, want, strict=True):
        torch.testing.assert_close(g, r.reshape(g.shape), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)


def test_one_adapter_everywhere_takes_the_row_plan_and_base_takes_none() -> None:
    serving, ref = served_block(POLICIES["numba"])
    seg = Segments.from_lengths([3, 0, 20], [1, 0, 1])  # the empty segment names slot 0
    serving.set_routing(seg)
    names = {
        n: type(p).__name__
        for n, p in zip(serving.wrapped_modules(), serving.routing.plans, strict=True)
        if p is not None
    }
    assert names == {"q_proj": "_KernelPlan", "v_proj": "_KernelPlan"}  # slot 1's targets
    ids = torch.randint(0, 50, (1, 23), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = serving(ids)
    for g, w in zip(got, reference_outputs(ref, ids, seg.token_slots()), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    serving.set_routing(Segments.from_lengths([4, 2], [-1, -1]))
    assert all(p is None for p in serving.routing.plans)


def test_merged_mode_takes_segments_of_the_merged_slot() -> None:
    serving, ref = served_block(POLICIES["numba"])
    serving.merge(0)
    seg = Segments.from_lengths([5, 1, 1], [0, 0, 0])
    serving.set_routing(seg)
    assert all(p is None for p in serving.routing.plans)  # the weights carry it
    ids = torch.randint(0, 50, (1, 7), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        got = serving(ids)
    for g, w in zip(got, reference_outputs(ref, ids, seg.token_slots()), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="slot 0 is merged"):
        serving.set_routing(Segments.from_lengths([5, 1], [0, 1]))


def test_segment_routing_errors_name_the_problem() -> None:
    serving, _ = served_block(POLICIES["numba"])
    serving.unload(2)
    with pytest.raises(ValueError, match="slot 2 is not loaded"):
        serving.set_routing(Segments.from_lengths([3, 1], [0, 2]))
    serving.set_routing(Segments.from_lengths([3, 1], [0, 1]))
    with pytest.raises(ValueError, match="input has 5 tokens, the segments cover 4"):
        serving(torch.zeros(1, 5, dtype=torch.long))

    conv = ServingModel(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), max_slots=1)
    w = conv.model[0].weight
    factors = tuple(torch.randn(d, 2) for d in w.shape)
    conv.load_modules(0, {"0": ModuleFactors("conv2d", torch.randn(2, 2, 2, 2), factors, 1.0)})
    with pytest.raises(ValueError, match="routes whole rows, not token segments"):
        conv.set_routing(Segments.from_lengths([1], [0]))


def test_projections_with_the_same_ranks_share_one_uploaded_routing_table(
    triton_kernel, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """One host-to-device copy per distinct routing table, not one per projection: q and v
    carry the same slot ranks and read one table; k's ranks differ."""
    monkeypatch.setattr(
        gk, "gpu_kernel_for", lambda enabled, *a: triton_kernel if enabled else None
    )
    torch.manual_seed(0)
    serving = ServingModel(Block().to(DEVICE), max_slots=2, policy=POLICIES["triton"])
    serving.load_modules(0, adapter({"q_proj": 4, "v_proj": 4}, seed=0))
    serving.load_modules(1, adapter({"q_proj": 8, "v_proj": 8, "k_proj": 2}, seed=1))
    seg = Segments.from_lengths([5, 1, 1], [0, 1, -1])
    serving.set_routing(seg)
    plans = dict(zip(serving.wrapped_modules(), serving.routing.plans, strict=True))
    ptr = {
        name: plans[name].tiles.untyped_storage().data_ptr()
        for name in ("q_proj", "k_proj", "v_proj")
    }
    assert ptr["q_proj"] == ptr["v_proj"] != ptr["k_proj"]
    serving.set_routing(Segments.from_lengths([4, 2, 1], [0, 1, -1]))  # another step: new tables
    again = dict(zip(serving.wrapped_modules(), serving.routing.plans, strict=True))
    assert again["q_proj"].tiles.untyped_storage().data_ptr() != ptr["q_proj"]
    assert again["q_proj"].tiles.tolist() == [[0, 4], [4, 6], [0, 1]]  # firsts, ends, slots


def test_the_routing_table_cache_keeps_the_newest(triton_kernel) -> None:  # type: ignore[no-untyped-def]
    device = torch.device(DEVICE)
    first = triton_kernel.table("a", lambda: [1, 2], device)
    assert triton_kernel.table("a", lambda: [9, 9], device) is first  # by key, no upload
    for i in range(triton_kernel.tables_kept):
        triton_kernel.table(i, lambda i=i: [i], device)
    assert triton_kernel.table("a", lambda: [3], device).tolist() == [3]  # evicted: uploaded
