"""The Triton row kernel (CUDA serving) against a plain per-row float64 reference, and its
capability check. Without a GPU, Triton's interpreter runs the kernel on the CPU; on a
CUDA machine the same tests run the compiled kernel there."""

from __future__ import annotations

import copy

import pytest
import torch

from flora.serving import ServingModel, ServingPolicy, reference_forward
from flora.serving.backends import triton_gpu as gk
from tests.unit.test_cpu_kernel import Proj, served_proj
from tests.unit.triton_modules import triton_modules

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU_POLICY = ServingPolicy(cpu_kernel=False)  # the numba kernel off: the CPU runs the GPU path


@pytest.fixture
def kernel(monkeypatch):  # type: ignore[no-untyped-def]
    """The kernel, compiled on a CUDA machine, else as Triton's interpreter runs it."""
    with triton_modules(monkeypatch, DEVICE):
        yield gk.load_row_kernel()


def bank(gen, n_in: int, n_out: int, ranks: list[int], rank_major: bool):  # type: ignore[no-untyped-def]
    """``A: [S, in, R]``, ``B: [S, R, out]`` with NaN beyond each slot's rank (reading it
    would show); ``rank_major`` stores ``A`` as the CPU kernel's ``[S, R, in]``, viewed."""
    cap = max(ranks)
    a = torch.randn(len(ranks), n_in, cap, generator=gen)
    b = torch.randn(len(ranks), cap, n_out, generator=gen)
    for s, r in enumerate(ranks):
        a[s, :, r:] = float("nan")
        b[s, r:] = float("nan")
    if rank_major:
        a = a.transpose(1, 2).contiguous().transpose(1, 2)
    return a, b


@pytest.mark.parametrize("tokens", [1, 3, 20])  # decode; short rows; two token tiles
@pytest.mark.parametrize("rank_major", [False, True])
def test_mixed_ranks_and_base_rows_match_reference(kernel, tokens: int, rank_major: bool) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(tokens)
    ranks = [4, 0, 19, 1]  # slot 1 not loaded here; 19 needs the 32-wide rank tile
    slots = [0, -1, 2, 3, 1, 0]
    a, b = (t.to(DEVICE) for t in bank(gen, 100, 70, ranks, rank_major))  # odd widths
    x = torch.randn(len(slots) * tokens, 100, generator=gen).to(DEVICE)
    y0 = torch.randn(x.shape[0], 70, generator=gen).to(DEVICE)
    y = y0.clone()
    as_int = lambda v: torch.tensor(v, dtype=torch.int32, device=DEVICE)  # noqa: E731
    kernel(y, x, as_int(slots), as_int(ranks), a, b, gk.block_rank(max(ranks)))
    want = y0.double() + gk.reference(x, slots, ranks, a, b)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-4)
    untouched = torch.tensor([ranks[s] == 0 if s >= 0 else True for s in slots])
    untouched = untouched.repeat_interleave(tokens).to(DEVICE)
    assert torch.equal(y[untouched], y0[untouched])  # bit for bit
    assert not torch.equal(y[~untouched], y0[~untouched])


def test_half_precision_accumulates_in_float32(kernel) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(1)
    ranks, slots = [8, 16], [1, 0, -1]
    a, b = (t.to(DEVICE, torch.float16) for t in bank(gen, 64, 48, ranks, rank_major=False))
    x = torch.randn(3, 64, generator=gen).to(DEVICE, torch.float16)
    y = torch.zeros(3, 48, dtype=torch.float16, device=DEVICE)
    as_int = lambda v: torch.tensor(v, dtype=torch.int32, device=DEVICE)  # noqa: E731
    kernel(y, x, as_int(slots), as_int(ranks), a, b, gk.block_rank(16))
    want = gk.reference(x, slots, ranks, a, b)
    torch.testing.assert_close(y.double(), want, rtol=2e-3, atol=2e-2)


def test_block_rank() -> None:
    assert [gk.block_rank(r) for r in (1, 8, 16, 17, 32, 33, 64)] == [16, 16, 16, 32, 32, 64, 64]


def test_self_test_passes_and_catches_a_wrong_kernel(kernel) -> None:  # type: ignore[no-untyped-def]
    gk.self_test(kernel, DEVICE, torch.float32)

    class Skips(gk.TritonRowKernel):  # adds nothing
        def __call__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            pass

    with pytest.raises(AssertionError):
        gk.self_test(Skips(kernel._k), DEVICE, torch.float32)


def test_capability_check(monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    cpu = torch.device("cpu")
    assert gk.gpu_kernel_for(True, cpu, torch.float32) is None  # CUDA only
    cuda = torch.device("cuda")
    assert gk.gpu_kernel_for(False, cuda, torch.float32) is None  # the policy's switch
    assert gk.gpu_kernel_for(True, cuda, torch.int8) is None
    gk.triton_row_kernel.cache_clear()
    try:
        monkeypatch.setenv("FLORA_TRITON", "0")
        assert gk.triton_row_kernel(cpu, torch.float32) is None
        monkeypatch.setenv("FLORA_TRITON", "1")
        gk.triton_row_kernel.cache_clear()

        def fails(*args) -> None:  # type: ignore[no-untyped-def]
            raise RuntimeError("no kernel image is available for execution on the device")

        monkeypatch.setattr(gk, "self_test", fails)
        with caplog.at_level("WARNING"):
            assert gk.triton_row_kernel(cpu, torch.float32) is None
        assert "triton row kernel disabled" in caplog.text and "no kernel image" in caplog.text
    finally:
        gk.triton_row_kernel.cache_clear()


def test_served_linear_uses_the_kernel_and_falls_back_under_autograd_on_the_gpu_path(
    kernel, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(gk, "gpu_kernel_for", lambda enabled, *a: kernel if enabled else None)
    serving, ref, adapters = served_proj(ServingPolicy(cpu_kernel=False), DEVICE)
    routing = [1, None, 0, 1]
    serving.set_routing(routing)
    plan = serving.routing.plans[0]
    assert type(plan).__name__ == "_TritonPlan"
    slots = {k: a["q"] for k, a in enumerate(adapters)}
    for t in (1, 17):
        x = torch.randn(4, 24, t, device=DEVICE).transpose(1, 2)  # non-contiguous
        with torch.no_grad():
            got = serving.model.q(x)
        torch.testing.assert_close(got, reference_forward(ref.q, x, routing, slots))
    assert plan.torch_path is None
    x = torch.randn(4, 2, 24, device=DEVICE, requires_grad=True)
    got = serving.model.q(x)
    got.sum().backward()
    assert plan.torch_path is not None and x.grad is not None
    torch.testing.assert_close(got, reference_forward(ref.q, x, routing, slots))
    off = ServingModel(
        Proj(), max_slots=1, policy=ServingPolicy(cpu_kernel=False, gpu_kernel=False)
    )
    off.load_modules(0, adapters[0])
    off.set_routing([0, None])
    assert type(off.routing.plans[0]).__name__ != "_TritonPlan"


def served_llama(kernel, monkeypatch, configs):  # type: ignore[no-untyped-def]
    """A tiny llama served through the Triton backend (``kernel``), one slot per config
    holding a random adapter of it; returns (base, adapters, serving)."""
    from tests.unit.test_serving_llama import make_adapter, tiny_llama

    monkeypatch.setattr(gk, "gpu_kernel_for", lambda enabled, *a: kernel if enabled else None)
    torch.manual_seed(0)
    base = tiny_llama()
    adapters = [make_adapter(base, c, seed=i) for i, c in enumerate(configs)]
    serving = ServingModel(copy.deepcopy(base).to(DEVICE), max_slots=4, policy=GPU_POLICY)
    for slot, adapter in enumerate(adapters):
        serving.load(slot, adapter)
    return base, adapters, serving


def test_a_mixed_llama_batch_through_the_kernel_matches_each_row_alone(kernel, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """End to end on a tiny llama: three adapters (one with per-module ranks, one also on
    the embeddings) and a base row in one batch, prefill then a cached decode step, every
    projection through the Triton kernel; each row equals the model run alone with its
    adapter applied by ``flora.apply_adapter``."""
    from tests.unit.test_serving_llama import (
        CACHE_KWARG,
        CONFIGS,
        alone,
    )

    base, adapters, serving = served_llama(kernel, monkeypatch, CONFIGS)
    rows = [0, 1, None, 2, 1, 0]
    ids = torch.randint(0, 100, (len(rows), 7), generator=torch.Generator().manual_seed(1))
    serving.set_routing(rows)
    kinds = {type(p).__name__ for p in serving.routing.plans if p is not None}
    assert "_TritonPlan" in kinds and "_KernelPlan" not in kinds
    with torch.no_grad():
        prefill = serving(ids[:, :6].to(DEVICE), use_cache=True)
        cache = {CACHE_KWARG: prefill.past_key_values}
        decode = serving(ids[:, 6:].to(DEVICE), **cache)
    for b, slot in enumerate(rows):
        want = alone(base, None if slot is None else adapters[slot], ids[b : b + 1])
        torch.testing.assert_close(prefill.logits[b].cpu(), want[0, :6], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(decode.logits[b].cpu(), want[0, 6:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("outs", [(24, 200), (70, 8, 136)])  # 2 and 3 members, 1-2 tiles
def test_decode_group_writes_each_members_delta(kernel, outs) -> None:  # type: ignore[no-untyped-def]
    """One launch for 2 or 3 siblings: each member's buffer gets its own delta (its own
    bank, ranks and width; NaN beyond a slot's rank would show), 0 for a base row and for
    a slot that does not target the member, plus the member's bias where it has one, and
    every entry is written."""
    gen = torch.Generator().manual_seed(len(outs))
    slots = [0, -1, 2, 1, 2, 3]
    member_ranks = [[4, 0, 19, 1], [3, 5, 0, 8], [8, 2, 6, 0]]
    x = torch.randn(len(slots), 40, generator=gen).to(DEVICE)
    as_int = lambda v: torch.tensor(v, dtype=torch.int32, device=DEVICE)  # noqa: E731
    members, want = [], []
    for m, n_out in enumerate(outs):
        ranks = member_ranks[m]
        a, b = (t.to(DEVICE) for t in bank(gen, 40, n_out, ranks, rank_major=m == 1))
        d = torch.full((len(slots), n_out), float("nan"), device=DEVICE)
        bias = torch.randn(n_out, generator=gen).to(DEVICE) if m == 1 else None
        members.append(gk.Member(d, as_int(ranks), a, b, bias))
        want.append(gk.reference(x, slots, ranks, a, b))
        if bias is not None:  # written with the delta: on a base row, the bias alone
            want[-1] += bias.double()
    kernel.decode_group(x, as_int(slots), members, gk.block_rank(19))
    for member, w in zip(members, want, strict=True):
        torch.testing.assert_close(member.d.double(), w, rtol=1e-5, atol=1e-4)
        assert bool((w != 0).any())


def _tensors_held(obj: object) -> list[torch.Tensor]:
    """The tensors among `obj`'s attributes, looking into lists, tuples and dicts (not into
    other objects: a group's member plans hold the banks and the base weights)."""

    def walk(value: object) -> list[torch.Tensor]:
        if isinstance(value, torch.Tensor):
            return [value]
        if isinstance(value, list | tuple):
            return [t for v in value for t in walk(v)]
        if isinstance(value, dict):
            return [t for v in value.values() for t in walk(v)]
        return []

    return walk(list(vars(obj).values()))


def test_graph_routing_shares_one_launch_per_sibling_group(kernel, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`set_graph_routing` on a tiny llama through the Triton backend: q/k/v and gate/up
    become decode groups (one launch each), o and down keep their own plan; a decode step
    of mixed rows (three adapters and a base row) equals each row alone, and the launches
    are counted."""
    from flora import FloraConfig
    from tests.unit.test_serving_llama import CACHE_KWARG, CONFIGS, alone

    # all seven projections; two of a group (q, v) and one of the other (up); o and down
    configs = [
        CONFIGS[0],
        FloraConfig(target_modules=["q_proj", "v_proj", "up_proj"], rank=8, scale=2.0),
        CONFIGS[2],
    ]
    base, adapters, serving = served_llama(kernel, monkeypatch, configs)
    rows = [0, 1, None, 2, 1, 0]
    ids = torch.randint(0, 100, (len(rows), 7), generator=torch.Generator().manual_seed(1))
    serving.set_routing(rows)
    with torch.no_grad():
        prefill = serving(ids[:, :6].to(DEVICE), use_cache=True)
    slots = torch.tensor([-1 if s is None else s for s in rows], dtype=torch.int32, device=DEVICE)
    serving.set_graph_routing(slots)
    kinds = {}
    for name, plan in zip(serving._wrapped, serving.routing.plans, strict=True):  # type: ignore[attr-defined]
        kinds.setdefault(type(plan).__name__, set()).add(name.rsplit(".", 1)[-1])
    assert kinds["_GroupMemberPlan"] == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    assert kinds["TritonGraphPlan"] == {"o_proj", "down_proj"}
    calls = {"group": 0}
    group_call = kernel.decode_group

    def counted_group(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["group"] += 1
        return group_call(*args, **kwargs)

    monkeypatch.setattr(kernel, "decode_group", counted_group)
    with torch.no_grad():
        decode = serving(ids[:, 6:].to(DEVICE), **{CACHE_KWARG: prefill.past_key_values})
    assert calls["group"] == 2 * 2  # two layers, q/k/v and gate/up
    # the deltas [rows, out] were the step's own: no group keeps one past it (in a CUDA
    # graph they come from the recording's pool instead of staying reserved per graph);
    # of its own the group holds the rows' slots (1-D) and no 2-D tensor
    groups = {p.group for p in serving.routing.plans if type(p).__name__ == "_GroupMemberPlan"}  # type: ignore[union-attr]
    held = [t for g in groups for t in _tensors_held(g)]
    assert len(groups) == 4 and all(g.shared.value is None for g in groups)
    assert held and all(t.dim() != 2 for t in held)
    for b, slot in enumerate(rows):
        want = alone(base, None if slot is None else adapters[slot], ids[b : b + 1])
        torch.testing.assert_close(decode.logits[b].cpu(), want[0, 6:], atol=1e-5, rtol=1e-5)
