"""The fused decode kernels (`paged/fused.py`): paged decode attention against a float64
SDPA reference per row, RMSNorm against transformers' own module, their installation on a
model (only where a module gives the same result: Gemma's `1 + weight` norm is left alone;
the kernel only inside a recording), and recorded decode graphs with the kernels against
graphs without them, with full and sliding-window attention. Triton's interpreter runs the
kernels on the CPU (bfloat16 only compiled, on CUDA: the interpreter mishandles it)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from test_paged_graphs import kv_for
from test_paged_windows import tiny, tokens
from tiny_engine import make_tiny_llama
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from flora.serving import ServingModel
from flora_server.engine.paged.capture import CudaGraphCapture, RecordedCapture
from flora_server.engine.paged.fused import (
    FusedKernels,
    fused_kernels,
    reference_decode_attention,
    self_test,
    self_test_o_delta,
)
from flora_server.engine.paged.fused_install import (
    install_rms_norms,
    install_rope,
    install_silu_mlps,
)
from flora_server.engine.paged.graphs import GraphedPagedRunner
from flora_server.engine.paged.runner import ChunkInput
from tests.unit.triton_modules import triton_modules

pytestmark = pytest.mark.timeout(300)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MODULE = "flora_server.engine.paged._fused_triton"
BF16 = pytest.param(
    torch.bfloat16,
    marks=pytest.mark.skipif(DEVICE.type == "cpu", reason="the interpreter mishandles bf16"),
)


@pytest.fixture
def kernels(monkeypatch):  # type: ignore[no-untyped-def]
    """Compiled on CUDA, else under the interpreter."""
    with triton_modules(monkeypatch, DEVICE, MODULE) as (module,):
        yield FusedKernels(module)


class Counted:
    """`FusedKernels` that counts the calls of its kernels (`calls`, by method name: a
    runner that silently skipped the kernels would match the torch path trivially)."""

    KERNELS = ("decode_attention", "write_kv", "rms_norm", "rope", "silu_mul")

    def __init__(self, inner: FusedKernels) -> None:
        self.inner = inner
        self.calls = dict.fromkeys(self.KERNELS, 0)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        found = getattr(self.inner, name)  # also recording(), active, prologues
        if name not in self.calls:
            return found

        def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
            self.calls[name] += 1
            return found(*args, **kwargs)

        return counted


# -- the kernels ------------------------------------------------------------------------------


@pytest.mark.parametrize("splits", [1, 4, 9])  # 4: of 35 positions; 9: of 16, some empty
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16])
def test_decode_attention_matches_sdpa_per_row(kernels, dtype, splits) -> None:
    gen = torch.Generator().manual_seed(0)
    slots, kv_heads, heads, dim = 400, 3, 9, 64  # SmolLM2's grouping: 3 queries per key head
    keys = torch.randn(slots, kv_heads, dim, generator=gen).to(DEVICE, dtype)
    values = torch.randn(slots, kv_heads, dim, generator=gen).to(DEVICE, dtype)
    q = torch.randn(8, heads, dim, generator=gen).to(DEVICE, dtype)
    # Rows of one key, of exactly one and just over one tile, of several; every column past
    # a row's length points at real, random keys, so reading past `lengths` would show.
    lengths = torch.tensor([1, 64, 65, 130, 17], dtype=torch.int32)
    read = torch.stack([torch.randperm(slots, generator=gen)[:140] for _ in lengths])
    rows = torch.tensor([6, 0, 3, 7, 1])  # decode rows among 8 packed tokens, out of order
    out = torch.full_like(q, 7.0)
    args = (read.to(DEVICE), lengths.to(DEVICE), rows.to(DEVICE))
    kernels.decode_attention(q, keys, values, *args, out, 0.125, splits)
    want = reference_decode_attention(q, keys, values, *args, 0.125)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out[rows.to(DEVICE)].double(), want, rtol=tol, atol=tol)
    untouched = [i for i in range(8) if i not in rows.tolist()]
    assert bool((out[untouched] == 7.0).all())  # rows that are not decode rows keep theirs
    # the same call with one row's length cut by one gives a different row (lengths read)
    short = lengths.clone()
    short[3] -= 1
    kernels.decode_attention(
        q, keys, values, read.to(DEVICE), short.to(DEVICE), args[2], out, 0.125, splits
    )
    assert not torch.allclose(out[7].double(), want[3], rtol=tol, atol=tol)


def test_decode_attention_splits_a_rows_keys_only_where_the_device_has_room(kernels) -> None:
    kernels.programs_wanted, kernels.min_split, kernels.max_splits = 264, 512, 16
    assert kernels.splits(96, 256) == 1  # one split's worth of keys
    assert kernels.splits(96, 4096) == 2  # 32 rows x 3 key heads: room for two each
    assert kernels.splits(12, 4096) == 8  # 4 rows: 8 splits of 512
    assert kernels.splits(3, 65536) == 16  # at most max_splits
    assert kernels.splits(264, 65536) == 1  # the rows fill the device
    kernels.programs_wanted = 0  # the default: never split
    assert kernels.splits(1, 65536) == 1


@pytest.mark.parametrize("pool", [torch.float32, torch.float16])
def test_write_kv_matches_index_copy(kernels, pool) -> None:
    """The step's keys and values (strided views, as transformers hands them over) into
    the pool at their slots, cast to the pool's dtype, bit for bit as `index_copy_`; other
    slots untouched."""
    gen = torch.Generator().manual_seed(2)
    keys, values = (torch.randn(40, 3, 24, generator=gen).to(DEVICE, pool) for _ in range(2))
    # [T, 1, H, D] -> [T, H, D] through a transpose, as the attention modules' views
    k, v = (torch.randn(5, 1, 3, 24, generator=gen).to(DEVICE).transpose(1, 2)[:, :, 0]
            for _ in range(2))  # fmt: skip
    write = torch.tensor([9, 0, 39, 17, 18], device=DEVICE)
    want_keys, want_values = keys.clone(), values.clone()
    want_keys.index_copy_(0, write, k.to(pool))
    want_values.index_copy_(0, write, v.to(pool))
    kernels.write_kv(keys, values, write, k, v)
    assert torch.equal(keys, want_keys) and torch.equal(values, want_values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16])
def test_rms_norm_matches_the_transformers_module(kernels, dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    module = LlamaRMSNorm(96, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        module.weight.copy_(torch.randn(96, generator=gen))
    module = module.to(dtype)
    x = (torch.randn(2, 96, 5, generator=gen) * 4).to(DEVICE, dtype).transpose(1, 2)  # strided
    got = kernels.rms_norm(x, module.weight, 1e-5)
    want = module(x)
    assert got.shape == want.shape == (2, 5, 96) and got.dtype == want.dtype
    # float32: the statistics differ by summation order only; halves: within one rounding
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16])
def test_rope_matches_transformers(kernels, dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    # the query as attention makes it: a transposed view of [B, T, H, D]
    q = torch.randn(2, 5, 4, 64, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    k = torch.randn(2, 2, 5, 64, generator=gen).to(DEVICE, dtype)
    angles = torch.rand(2, 5, 64, generator=gen) * 20
    cos, sin = (f(angles).to(DEVICE, dtype) for f in (torch.cos, torch.sin))
    assert kernels.rope_fits(q, k, cos, sin)
    got = kernels.rope(q, k, cos, sin)
    want = apply_rotary_pos_emb(q, k, cos, sin)
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # halves: each product rounded alike
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype and g.stride() == w.stride()
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)
    # a rotation by the wrong half would differ: the kernel is not the identity on sin
    assert not torch.allclose(got[0], q * cos.unsqueeze(1))
    assert not kernels.rope_fits(q, k, cos[:, :3], sin[:, :3])  # tokens differ: refused


def test_install_rope_through_the_attention_hook(kernels) -> None:
    model = make_tiny_llama().to(DEVICE)
    reference = copy.deepcopy(model)
    counted = Counted(kernels)
    assert install_rope(model, counted) == 2  # one per attention module
    assert install_rope(model, counted) == 0
    assert counted.calls["rope"] == 1  # the probe
    ids = torch.tensor([[5, 9, 14, 3, 77, 20]], device=DEVICE)
    with torch.no_grad():
        want = reference(ids).logits
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-4)
        assert counted.calls["rope"] == 1  # outside a recording: transformers' own
        with counted.recording():
            got = model(ids).logits
    assert counted.calls["rope"] == 1 + 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_install_serves_llama_norms_and_leaves_gemma_alone(kernels) -> None:
    model = make_tiny_llama().to(DEVICE)
    reference = copy.deepcopy(model)
    counted = Counted(kernels)
    assert install_rms_norms(model, counted) == 2 * 2 + 1  # two per layer and the final one
    assert install_rms_norms(model, counted) == 0  # already served
    ids = torch.tensor([[5, 9, 14, 3, 77, 20]], device=DEVICE)
    with torch.no_grad():
        want = reference(ids).logits
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-4)
        assert counted.calls["rms_norm"] == 1  # the probe of the class; outside a recording: torch
        with counted.recording():
            got = model(ids).logits
        assert not counted.active
    assert counted.calls["rms_norm"] == 1 + (2 * 2 + 1)  # inside: each norm through the kernel
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    layer = model.model.layers[1]  # each layer's norms know the projections they feed
    assert layer.input_layernorm.forward.feeds is layer.self_attn
    assert layer.post_attention_layernorm.forward.feeds is layer.mlp
    assert model.model.norm.forward.feeds is None
    gemma = tiny("gemma3").to(DEVICE)  # (1 + weight): the probe differs, nothing installed
    assert install_rms_norms(gemma, counted) == 0
    assert not any("forward" in vars(m) for m in gemma.modules())


def test_install_serves_silu_mlps_and_leaves_gelu_ones_alone(kernels) -> None:
    model = make_tiny_llama().to(DEVICE)
    reference = copy.deepcopy(model)
    counted = Counted(kernels)
    assert install_silu_mlps(model, counted) == 2  # one per layer
    assert install_silu_mlps(model, counted) == 0  # already served
    assert counted.calls["silu_mul"] == 1  # the probe of the class
    ids = torch.tensor([[5, 9, 14, 3, 77, 20]], device=DEVICE)
    with torch.no_grad():
        want = reference(ids).logits
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-4)
        assert counted.calls["silu_mul"] == 1  # outside a recording: the module's own forward
        with counted.recording():
            got = model(ids).logits
    assert counted.calls["silu_mul"] == 1 + 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    gemma = tiny("gemma3").to(DEVICE)  # the Llama MLP's code with a GELU: the probe differs
    assert install_silu_mlps(gemma, counted) == 0
    assert not any("forward" in vars(m) for m in gemma.modules())


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 2)])  # GQA 1:1, 3:1, 4:1
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16])
def test_decode_attention_writes_os_delta_of_its_output(kernels, dtype, heads, kv_heads) -> None:
    """o's delta from inside decode attention: each row's ``(out @ A_s) @ B_s`` over the
    output as stored (float64 reference), 0 for a base row and a slot of rank 0 (whose
    bank is NaN there), plus o's bias where it has one, written at the rows' tokens; the
    output itself as without it; the done-counts left at zero, so a second launch is right
    too."""
    from flora.serving.backends import triton_gpu as gk
    from tests.unit.test_gpu_kernel import bank

    gen = torch.Generator().manual_seed(heads)
    dim, n_out, rows_n = 16, 300, 5  # three tiles of o's expand

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    keys, values, q = rand(90, kv_heads, dim), rand(90, kv_heads, dim), rand(7, heads, dim)
    read = torch.randperm(90, generator=gen)[:70].view(rows_n, 14).to(DEVICE)
    lengths = torch.tensor([14, 1, 9, 5, 12], dtype=torch.int32, device=DEVICE)
    rows = torch.tensor([6, 0, 3, 1, 4], device=DEVICE)  # tokens 2 and 5: no decode row
    ranks, slots = [4, 0, 19, 1], [1, 2, 9, -1, 0, 9, 3]  # 9: never read
    a, b = (t.to(DEVICE, dtype) for t in bank(gen, heads * dim, n_out, ranks, rank_major=False))
    plain = torch.zeros_like(q)
    kernels.decode_attention(q, keys, values, read, lengths, rows, plain, 0.3, 1)
    done = torch.zeros(7, dtype=torch.int32, device=DEVICE)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for bias in (None, torch.randn(n_out, generator=gen).to(DEVICE, dtype)):  # counts reset
        out, d = torch.zeros_like(q), torch.full((7, n_out), float("nan"), device=DEVICE)
        proj = gk.member_arg(gk.Member(d.to(dtype), as_int(ranks), a, b, bias))
        o_delta = gk.ODelta(as_int(slots), proj, done, gk.block_rank(19))
        kernels.decode_attention(q, keys, values, read, lengths, rows, out, 0.3, 1, o_delta)
        assert torch.equal(out, plain)
        got = proj[3].double()  # the delta buffer
        decoded = rows.tolist()
        want = gk.reference(out.view(7, -1)[decoded], [slots[r] for r in decoded], ranks, a, b)
        assert bool(want[0].any()) and not want[[1, 2]].any()  # slot 1 of rank 0; a base row
        if bias is not None:  # written with the delta: on a base row, the bias alone
            want += bias.double()
        torch.testing.assert_close(got[decoded], want, rtol=tol, atol=tol)
        assert got[[2, 5]].isnan().all()  # tokens without a decode row: not written
        assert not done.any()
    with pytest.raises(ValueError, match="split"):
        kernels.decode_attention(q, keys, values, read, lengths, rows, out, 0.3, 2, o_delta)


def as_int(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def test_self_test_passes_and_catches_a_wrong_kernel(kernels) -> None:
    self_test(kernels, DEVICE, torch.float32)

    class NoRotation(Counted):
        def rope(self, q, k, cos, sin):  # type: ignore[no-untyped-def]
            return q.clone(), k.clone()

    with pytest.raises(AssertionError):
        self_test(NoRotation(kernels), DEVICE, torch.float32)  # type: ignore[arg-type]
    assert fused_kernels(torch.device("cpu"), torch.float32) is None  # CUDA only
    self_test_o_delta(kernels, DEVICE, torch.float32)

    class NoDelta(Counted):
        def decode_attention(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            return self.inner.decode_attention(*args[:9])  # drops o_delta

    with pytest.raises(AssertionError):
        self_test_o_delta(NoDelta(kernels), DEVICE, torch.float32)  # type: ignore[arg-type]


# -- the runners --------------------------------------------------------------------------------


def graphed_runner(model: torch.nn.Module, kernels: FusedKernels | None):
    blocks = 64
    serving = ServingModel(model, max_slots=2)
    capture = RecordedCapture() if DEVICE.type == "cpu" else CudaGraphCapture(DEVICE)
    runner = GraphedPagedRunner(
        model,
        kv_for(model, blocks + 1, DEVICE.type),
        serving,
        capture,
        scratch_block=blocks,
        fused=kernels,
    )
    return runner, serving.set_routing


def steps(runner, route, n_decode: int) -> list[torch.Tensor]:
    """Three prompts (one past the window) prefilled, the third in two chunks, the second
    chunk packed with decode tokens of the others; then decode steps of all three. Greedy;
    returns every step's logits."""
    seqs = [tokens(11, 13), tokens(12, 6), tokens(13, 9)]
    tables = [list(range(i * 16, i * 16 + 16)) for i in range(3)]
    out = []

    def run(chunks, sample):  # type: ignore[no-untyped-def]
        slots = [None] * sum(len(c.token_ids) for c in chunks)
        logits = runner.run(chunks, slots, sample, route)
        out.append(logits)
        return logits.argmax(-1).tolist()

    firsts = run([ChunkInput(seqs[0], 0, tables[0]), ChunkInput(seqs[1], 0, tables[1])], [12, 18])
    seqs[0].append(firsts[0])
    seqs[1].append(firsts[1])
    run([ChunkInput(seqs[2][:5], 0, tables[2])], [4])
    mixed = [ChunkInput(seqs[0][-1:], len(seqs[0]) - 1, tables[0]),
             ChunkInput(seqs[2][5:], 5, tables[2]),
             ChunkInput(seqs[1][-1:], len(seqs[1]) - 1, tables[1])]  # fmt: skip
    picked = run(mixed, [0, 4, 5])
    for seq, token in zip((seqs[0], seqs[2], seqs[1]), picked, strict=True):
        seq.append(token)
    for _ in range(n_decode):
        chunks = [ChunkInput(s[-1:], len(s) - 1, t) for s, t in zip(seqs, tables, strict=True)]
        for seq, token in zip(seqs, run(chunks, [0, 1, 2]), strict=True):
            seq.append(token)
    return out


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_recorded_decode_with_fused_kernels_matches_the_torch_graphs(kernels, kind, split) -> None:
    """Prefill chunks and a mixed step, then decode steps past the sliding window
    (Mistral, W=8; Qwen2 past its first layer, with q/k/v biases), all replayed: the same
    logits with the kernels and one GEMM per sibling set in the graphs as with SDPA,
    transformers' norms and MLPs and a GEMM per projection there, and the kernels run in
    recordings only; `split`: each row's keys split across programs (flash decoding)
    wherever they span more than one tile of positions."""
    if split:
        kernels.programs_wanted, kernels.min_split = 10_000, 16
    model = make_tiny_llama() if kind == "llama" else tiny(kind)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():  # Qwen2's q/k/v biases start at zero: make them count
        for name, param in model.named_parameters():
            if name.endswith("_proj.bias"):
                param.copy_(torch.randn(param.shape, generator=gen))
    model = model.to(DEVICE)
    torch_runner, torch_route = graphed_runner(copy.deepcopy(model), None)
    counted = Counted(kernels)
    fused_runner, fused_route = graphed_runner(model, counted)  # type: ignore[arg-type]
    want = steps(torch_runner, torch_route, 6)
    got = steps(fused_runner, fused_route, 6)
    assert fused_runner.replays == torch_runner.replays == 3 + 6
    assert fused_runner.eager_steps == torch_runner.eager_steps == 0
    # Every run of the recorded Python (on the CPU each replay re-runs it; on CUDA two
    # warm-ups and the capture per graph) and nothing else.
    captures = fused_runner.capture.captures
    runs = fused_runner.replays + captures if DEVICE.type == "cpu" else 3 * captures
    layers = model.config.num_hidden_layers
    assert counted.calls["decode_attention"] == counted.calls["write_kv"] == layers * runs
    assert (
        counted.calls["rms_norm"] == 1 + (2 * layers + 1) * runs
    )  # the install's probe, then each run
    assert counted.calls["rope"] == 1 + layers * runs
    assert counted.calls["silu_mul"] == 1 + layers * runs
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert a.argmax(-1).tolist() == b.argmax(-1).tolist()


@pytest.mark.parametrize("biased", [False, True])
def test_recorded_adapter_decode_computes_deltas_in_the_norm_and_mlp_kernels(
    kernels, monkeypatch, biased
) -> None:  # type: ignore[no-untyped-def]
    """Adapter rows (two adapters on every projection, and a base row) through the Triton
    adapter kernel: with the fused kernels the norms compute q/k/v's and gate/up's deltas,
    SiLU-multiply down's and decode attention o's, leaving no adapter launch of its own;
    the logits equal those of graphs without the fused kernels (a group launch for q/k/v
    and gate/up, the row kernel for o and down); with `prologues` switched off the runner
    records its graphs again, launching as those do; with the keys split across programs,
    o launches its own again. `biased`: every projection has a random bias (Llama's
    attention and MLP biases; Qwen2's q/k/v have theirs), which the kernels write with
    the deltas: the same launches, and the logits also equal the torch backend's (no
    Triton adapter kernel at all)."""
    from flora import FloraConfig
    from flora.serving import ServingPolicy
    from flora.serving.backends import triton_gpu as gk
    from tests.unit.test_gpu_prologues import Launches
    from tests.unit.test_serving_llama import PROJ, make_adapter

    row_kernel = gk.load_row_kernel()  # as `kernels`: compiled, or interpreted
    monkeypatch.setattr(gk, "gpu_kernel_for", lambda enabled, *a: row_kernel if enabled else None)
    model = make_tiny_llama(attention_bias=biased, mlp_bias=biased)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(6)
        for name, param in model.named_parameters():
            if name.endswith("_proj.bias"):
                param.copy_(torch.randn(param.shape, generator=gen))
    adapters = [make_adapter(model, FloraConfig(target_modules=PROJ, rank=r, scale=s), seed=r)
                for r, s in ((4, 1.0), (8, 2.0))]  # fmt: skip
    model.to(DEVICE)
    blocks = 64

    def runner(fused, gpu_kernel: bool = True):  # type: ignore[no-untyped-def]
        served = copy.deepcopy(model)
        policy = ServingPolicy(cpu_kernel=False, gpu_kernel=gpu_kernel)
        serving = ServingModel(served, max_slots=2, policy=policy)
        for slot, adapter in enumerate(adapters):
            serving.load(slot, adapter)
        capture = RecordedCapture() if DEVICE.type == "cpu" else CudaGraphCapture(DEVICE)
        return GraphedPagedRunner(
            served, kv_for(served, blocks + 1, DEVICE.type), serving, capture,
            scratch_block=blocks, buckets=(1, 2, 4), fused=fused,
        ), serving.set_routing  # fmt: skip

    slots = [0, 1, None, 0]

    def decode(runner, route, n: int) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
        seqs = [tokens(i + 3, 5 + i) for i in range(4)]
        tables = [list(range(i * 16, i * 16 + 16)) for i in range(4)]
        chunks = [ChunkInput(s, 0, t) for s, t in zip(seqs, tables, strict=True)]
        ends = list(itertools.accumulate(len(s) for s in seqs))
        # an eager prefill, base rows (the adapters' segment kernel is slow interpreted)
        out = [runner.run(chunks, [None] * ends[-1], [e - 1 for e in ends], route)]
        for _ in range(n):
            for seq, token in zip(seqs, out[-1].argmax(-1).tolist(), strict=True):
                seq.append(token)
            chunks = [ChunkInput(s[-1:], len(s) - 1, t) for s, t in zip(seqs, tables, strict=True)]
            out.append(runner.run(chunks, slots, [0, 1, 2, 3], route))
        return out

    launches = Launches(row_kernel, monkeypatch)
    want = decode(*runner(None), 3)
    plain = launches.take()
    if biased:  # the adapters' torch path: the biases in the base layers' own GEMMs
        torch_path = decode(*runner(None, gpu_kernel=False), 3)
        assert launches.take() == dict.fromkeys(plain, 0)
        for a, b in zip(want, torch_path, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    fused_runner, fused_route = runner(kernels)
    got = decode(fused_runner, fused_route, 3)
    fused = launches.take()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert a.argmax(-1).tolist() == b.argmax(-1).tolist()
    # each run of the recorded Python (CPU: the capture, then each replay; CUDA: two
    # warm-ups and the capture), per layer
    captures = fused_runner.capture.captures
    runs = (fused_runner.replays + captures if DEVICE.type == "cpu" else 3 * captures) * 2
    assert fused_runner.replays == 3 and captures == 1
    assert {k: fused[k] for k in ("group", "norm_group", "act")} == {
        "group": 0, "norm_group": 2 * runs, "act": runs
    }  # fmt: skip
    assert plain["group"] == 2 * runs and plain["norm_group"] == plain["act"] == 0
    assert fused["row"] == 0 and plain["row"] == 2 * runs  # none; o's and down's

    kernels.prologues = False  # the runner drops its graphs and records them again
    off = decode(fused_runner, fused_route, 3)
    assert launches.take() == plain and fused_runner.replays == 6
    for a, b in zip(off, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    recorded = fused_runner.capture.captures
    kernels.prologues = True
    kernels.programs_wanted, kernels.min_split = 10_000, 4  # split the keys: recorded again
    split = decode(fused_runner, fused_route, 3)
    assert fused_runner.capture.captures == recorded + 1
    assert launches.take()["row"] == runs  # o's own launch: split keys hold no whole row
    for a, b in zip(split, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
