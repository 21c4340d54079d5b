"""The prologue kernels (``_prologue_triton``): a decode step's adapter deltas computed in
the launch that forms the projections' input (RMSNorm for q/k/v and gate/up, SiLU-and-
multiply for down), against float64 references, and the plans that hand the deltas to
the projections. Compiled on CUDA, else under Triton's interpreter."""

from __future__ import annotations

import pytest
import torch

from flora import FloraConfig
from flora.serving.backends import triton_gpu as gk
from tests.unit.test_gpu_kernel import DEVICE, bank, served_llama
from tests.unit.triton_modules import triton_modules

SLOTS = [0, -1, 2, 1, 2, 3]
MEMBER_RANKS = [[4, 0, 19, 1], [3, 5, 0, 8], [8, 2, 6, 0]]


@pytest.fixture
def kernel(monkeypatch):  # type: ignore[no-untyped-def]
    with triton_modules(monkeypatch, DEVICE):
        yield gk.load_row_kernel()


def as_int(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def nans(*shape: int) -> torch.Tensor:
    return torch.full(shape, float("nan"), device=DEVICE)


@pytest.mark.parametrize("outs", [(24, 200), (70, 8, 136)])  # 2 and 3 members, 1-2 tiles
def test_norm_decode_group_writes_the_norm_and_each_members_delta(kernel, outs) -> None:  # type: ignore[no-untyped-def]
    """Every row normalised (base rows too) and each member's delta computed from the
    normalised row, 0 for a base row and for a slot the member does not hold, plus the
    member's bias where it has one (member 1)."""
    gen = torch.Generator().manual_seed(len(outs))
    x = (torch.randn(len(SLOTS), 300, generator=gen) * 3).to(DEVICE)  # two input steps
    w = torch.randn(300, generator=gen).to(DEVICE)
    members = []
    for m, n_out in enumerate(outs):
        a, b = (t.to(DEVICE) for t in bank(gen, 300, n_out, MEMBER_RANKS[m], rank_major=m == 1))
        bias = torch.randn(n_out, generator=gen).to(DEVICE) if m == 1 else None
        members.append(gk.Member(nans(len(SLOTS), n_out), as_int(MEMBER_RANKS[m]), a, b, bias))
    y = nans(len(SLOTS), 300)
    kernel.norm_decode_group(x, w, 1e-6, y, as_int(SLOTS), members, gk.block_rank(19))
    xd = x.double()
    want_y = w.double() * xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-5)
    for m, (d, _, a, b, bias) in enumerate(members):
        want = gk.reference(want_y, SLOTS, MEMBER_RANKS[m], a, b)
        assert bool((want != 0).any()) and not want[1].any()  # row 1 is a base row
        if bias is not None:
            want += bias.double()
        torch.testing.assert_close(d.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("biased", [False, True])
def test_act_decode_writes_the_product_and_its_delta(kernel, biased) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(3)
    ranks = MEMBER_RANKS[0]
    gate, up = ((torch.randn(len(SLOTS), 300, generator=gen) * 4).to(DEVICE) for _ in range(2))
    a, b = (t.to(DEVICE) for t in bank(gen, 300, 136, ranks, rank_major=False))
    bias = torch.randn(136, generator=gen).to(DEVICE) if biased else None
    act, d = nans(len(SLOTS), 300), nans(len(SLOTS), 136)
    member = gk.Member(d, as_int(ranks), a, b, bias)
    kernel.act_decode(gate, up, act, as_int(SLOTS), member, gk.block_rank(19))
    gd = gate.double()
    want_act = gd * torch.sigmoid(gd) * up.double()
    torch.testing.assert_close(act.double(), want_act, rtol=1e-5, atol=1e-5)
    want = gk.reference(want_act, SLOTS, ranks, a, b)
    assert bool((want != 0).any()) and not want[1].any()  # row 1 is a base row
    if bias is not None:
        want += bias.double()
    torch.testing.assert_close(d.double(), want, rtol=1e-4, atol=1e-4)


class Launches:
    """Counts the kernel's launches by kind (``monkeypatch``ed onto the kernel)."""

    def __init__(self, kernel: gk.TritonRowKernel, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts = {"row": 0, "group": 0, "norm_group": 0, "act": 0}
        for kind, name in [("group", "decode_group"), ("norm_group", "norm_decode_group"),
                           ("act", "act_decode")]:  # fmt: skip
            monkeypatch.setattr(kernel, name, self._counted(kind, getattr(kernel, name)))
        monkeypatch.setattr(type(kernel), "__call__", self._counted("row", type(kernel).__call__))

    def _counted(self, kind: str, call):  # type: ignore[no-untyped-def]
        def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
            self.counts[kind] += 1
            return call(*args, **kwargs)

        return counted

    def take(self) -> dict[str, int]:
        counts, self.counts = self.counts, dict.fromkeys(self.counts, 0)
        return counts


def test_prologues_hand_their_deltas_to_the_projections(kernel, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """On a tiny llama under graph routing (mixed adapters and a base row): the norm's
    launch serves q/k/v and SiLU-multiply's serves down, each projection then equal to
    the same projection computing its own delta from an equal input; no other launch.
    Where the plans are not one group, or the rows are not the routing's, the prologue
    declines."""
    configs = [
        FloraConfig(target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], rank=4),
        FloraConfig(target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], rank=7, scale=2.0),
    ]
    _, _, serving = served_llama(kernel, monkeypatch, configs)
    rows = [0, 1, None, 1]
    serving.set_graph_routing(as_int([-1 if s is None else s for s in rows]))
    layer = serving.model.model.layers[0]
    attn, mlp, norm = layer.self_attn, layer.mlp, layer.input_layernorm
    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    launches = Launches(kernel, monkeypatch)
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(len(rows), 1, 64, generator=gen) * 2).to(DEVICE)
    with torch.no_grad():
        # a plan that is no group member (down's, a `TritonGraphPlan`) is passed over
        plans = [p.plan for p in (*qkv, mlp.down_proj)]
        assert type(plans[-1]).__name__ == "TritonGraphPlan"
        y = gk.rms_norm_with_deltas(plans, x, norm.weight, norm.variance_epsilon)
        assert y is not None and y.shape == x.shape
        got = [p(y) for p in qkv]
        assert launches.take() == {"row": 0, "group": 0, "norm_group": 1, "act": 0}
        torch.testing.assert_close(y, norm(x), rtol=1e-6, atol=1e-6)  # the module's own
        other = y.clone()  # an equal input, another tensor: the group computes its own
        want = [p(other) for p in qkv]
        assert launches.take() == {"row": 0, "group": 1, "norm_group": 0, "act": 0}
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)

        gate, up = (
            (torch.randn(len(rows), 1, 128, generator=gen) * 3).to(DEVICE) for _ in range(2)
        )
        act = gk.silu_mul_with_delta(mlp.down_proj.plan, gate, up)
        assert act is not None
        torch.testing.assert_close(act, mlp.act_fn(gate) * up, rtol=1e-6, atol=1e-6)
        got_down = mlp.down_proj(act)
        assert launches.take() == {"row": 0, "group": 0, "norm_group": 0, "act": 1}
        want_down = mlp.down_proj(act.clone())  # its own delta: the row kernel
        assert launches.take() == {"row": 1, "group": 0, "norm_group": 0, "act": 0}
        torch.testing.assert_close(got_down, want_down, rtol=1e-5, atol=1e-5)
        assert not mlp.down_proj.plan.seeded.pending  # taken once, then dropped

        # declined: a member without a plan, rows not the routing's, not a graph plan
        assert (
            gk.rms_norm_with_deltas([qkv[0].plan, None, qkv[2].plan], x, norm.weight, 1e-6) is None
        )
        assert gk.rms_norm_with_deltas([p.plan for p in qkv], x[:3], norm.weight, 1e-6) is None
        assert gk.silu_mul_with_delta(None, gate, up) is None
        assert gk.silu_mul_with_delta(qkv[0].plan, gate, up) is None
        assert gk.silu_mul_with_delta(mlp.down_proj.plan, gate[:3], up[:3]) is None
        kernel.prologues = None  # their self-test failed on this device
        assert gk.rms_norm_with_deltas([p.plan for p in qkv], x, norm.weight, 1e-6) is None
        assert gk.silu_mul_with_delta(mlp.down_proj.plan, gate, up) is None
    assert launches.take() == {"row": 0, "group": 0, "norm_group": 0, "act": 0}


def test_prologue_self_test_passes_and_catches_a_wrong_kernel(kernel) -> None:  # type: ignore[no-untyped-def]
    gk.self_test_prologues(kernel, DEVICE, torch.float32)

    class NoDelta(gk.TritonRowKernel):  # the product right, the delta never written
        def act_decode(self, gate, up, act, slots, member, block_r) -> None:  # type: ignore[no-untyped-def]
            member[0].zero_()
            act.copy_(gk.reference_silu_mul(gate, up))

    with pytest.raises(AssertionError):
        gk.self_test_prologues(NoDelta(kernel._k, kernel.prologues), DEVICE, torch.float32)


def test_failing_prologues_leave_the_row_kernel_serving(monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    """The prologue kernels have a self-test of their own: where it fails, the row kernel
    still serves, without them (the norms and SiLU-multiply then compute no deltas)."""

    def fails(*args) -> None:  # type: ignore[no-untyped-def]
        raise RuntimeError("an unsupported construct")

    cpu = torch.device("cpu")
    gk.triton_row_kernel.cache_clear()
    try:
        with triton_modules(monkeypatch, cpu):
            monkeypatch.setattr(gk, "self_test", lambda *args: None)
            monkeypatch.setattr(gk, "self_test_prologues", fails)
            with caplog.at_level("WARNING"):
                kernel = gk.triton_row_kernel(cpu, torch.float32)
        assert kernel is not None and kernel.prologues is None
        assert "prologue kernels disabled" in caplog.text and "unsupported" in caplog.text
    finally:
        gk.triton_row_kernel.cache_clear()


def test_q_and_v_only_adapters_group_and_take_the_norms_deltas(kernel, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """PEFT's default targets (q and v; k never wrapped, or wrapped with no loaded slot
    targeting it): q and v still form one group beside k's base layer, the norm's launch
    serves them, and a decode step equals each row alone."""
    from tests.unit.test_serving_llama import CACHE_KWARG, alone

    configs = [
        FloraConfig(target_modules=["q_proj", "v_proj"], rank=4),
        FloraConfig(target_modules=["q_proj", "v_proj"], rank=6, scale=2.0),
        FloraConfig(target_modules=["q_proj", "k_proj", "v_proj"], rank=2),
    ]
    base, adapters, serving = served_llama(kernel, monkeypatch, configs)
    serving.unload(2)  # k stays wrapped, and no loaded slot targets it
    rows = [0, 1, None, 1]
    ids = torch.randint(0, 100, (len(rows), 7), generator=torch.Generator().manual_seed(2))
    serving.set_routing(rows)
    with torch.no_grad():
        prefill = serving(ids[:, :6].to(DEVICE), use_cache=True)
    serving.set_graph_routing(as_int([-1 if s is None else s for s in rows]))
    attn = serving.model.model.layers[0].self_attn
    kinds = [type(p.plan).__name__ for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
    assert kinds == ["_GroupMemberPlan", "NoneType", "_GroupMemberPlan"]
    launches = Launches(kernel, monkeypatch)
    with torch.no_grad():
        # the model's forward does not call the prologue: compute it as the engine's norm
        # would, then check the group takes it and k reads the same normalised rows
        x = torch.randn(len(rows), 1, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
        norm = serving.model.model.layers[0].input_layernorm
        plans = [attn.q_proj.plan, None, attn.v_proj.plan]
        y = gk.rms_norm_with_deltas(plans, x, norm.weight, norm.variance_epsilon)
        assert y is not None
        got = [attn.q_proj(y), attn.v_proj(y)]
        assert launches.take() == {"row": 0, "group": 0, "norm_group": 1, "act": 0}
        other = y.clone()
        want = [attn.q_proj(other), attn.v_proj(other)]
        assert launches.take() == {"row": 0, "group": 1, "norm_group": 0, "act": 0}
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        decode = serving(ids[:, 6:].to(DEVICE), **{CACHE_KWARG: prefill.past_key_values})
    assert launches.take()["group"] == 2  # one per layer, q and v
    for b, slot in enumerate(rows):
        want_row = alone(base, None if slot is None else adapters[slot], ids[b : b + 1])
        torch.testing.assert_close(decode.logits[b].cpu(), want_row[0, 6:], atol=1e-5, rtol=1e-5)


def test_a_seed_goes_to_its_input_or_a_view_of_the_same_elements_only() -> None:
    """``PerInput``: what a kernel computed for the tensor it wrote is taken by a member
    called on that tensor or on a contiguous view of the same elements (transformers
    reshapes the attention output before o), never by one called on other elements."""
    from flora.serving.backends.base import PerInput

    x = torch.randn(4, 6)
    seeds = PerInput(2)
    seeds.seed(x, "delta")
    assert seeds.seeded(x.clone(), 0) is None  # equal values, other memory
    assert seeds.seeded(x[:2], 0) is None  # the same start, fewer elements
    assert seeds.seeded(x[1:], 0) is None
    assert seeds.seeded(x.t(), 0) is None  # the same elements in another order
    assert seeds.seeded(x.view(2, 1, 12), 0) == "delta"
    assert seeds.seeded(x.view(2, 1, 12), 0) is None  # member 0 took it
    assert seeds.seeded(x, 1) == "delta"
    assert seeds.x is None and seeds.value is None  # every member served: dropped


def test_o_takes_the_delta_seeded_for_its_input_and_declines_otherwise(kernel, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """o's side of the hand-off from decode attention (``attention_o_delta``): the plan
    hands out its delta buffer for the output the kernel is about to write, and o's call on
    a contiguous view of that output adds the buffer in one GEMM; called on other memory it
    computes its own. Declined (``None``): no graph plan, rows not the routing's, a
    non-contiguous output, the prologue kernels off."""
    configs = [FloraConfig(target_modules=["o_proj"], rank=r) for r in (4, 7)]
    _, _, serving = served_llama(kernel, monkeypatch, configs)
    rows = [0, 1, None, 1]
    serving.set_graph_routing(as_int([-1 if s is None else s for s in rows]))
    o = serving.model.model.layers[0].self_attn.o_proj
    gen = torch.Generator().manual_seed(9)
    out = torch.randn(len(rows), 64, generator=gen).to(DEVICE)  # the attention's rows
    launches = Launches(kernel, monkeypatch)
    with torch.no_grad():
        handed = gk.attention_o_delta(o.plan, out)
        assert handed is not None
        delta = handed.proj[3]  # what the attention kernel would write
        delta.copy_(torch.randn(delta.shape, generator=gen))
        got = o(out.view(len(rows), 1, 64))  # transformers' reshape: another tensor object
        assert launches.take()["row"] == 0
        want = out @ o.weight.t() + delta
        torch.testing.assert_close(got.view(len(rows), -1), want, rtol=1e-5, atol=1e-5)
        own = o(out.clone())  # other memory: o computes its own delta
        assert launches.take()["row"] == 1
        assert not torch.allclose(own.view(len(rows), -1), want)

        assert gk.attention_o_delta(None, out) is None
        assert gk.attention_o_delta(o.plan, out[:3]) is None
        assert gk.attention_o_delta(o.plan, out.t().contiguous().t()) is None
        kernel.prologues = None
        assert gk.attention_o_delta(o.plan, out) is None
