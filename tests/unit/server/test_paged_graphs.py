"""Decode graphs (`paged/graphs.py`) on the CPU through `RecordedCapture`, which re-runs the
recorded Python on replay against the same buffers: the graphed runner's logits and KV
writes equal the eager runner's across bucket padding, changing batch sizes, adapter loads
between replays, merged-mode switches and a bank re-allocation; the capability check keeps
the CPU eager; engine v2 with graphs gives the same greedy tokens as independent
references."""

from __future__ import annotations

import contextlib
import gc
import inspect
import weakref

import pytest
import torch
from test_engine import ADAPTER_OF, PROMPTS, collect, greedy, run
from test_engine_batch import greedy_alone
from test_paged_engine import make_engine
from tiny_engine import make_flora_adapter, make_tiny_llama, merged_reference_model

from flora.serving import ServingModel
from flora_server.engine.paged.graphs import (
    CudaGraphCapture,
    GraphedPagedRunner,
    RecordedCapture,
    graph_capture_for,
)
from flora_server.engine.paged.runner import ChunkInput, KVTensors, PagedRunner
from flora_server.engine.protocol import GenerationRequest

pytestmark = pytest.mark.timeout(180)
BS = 4  # tokens per block
BLOCKS = 64  # per runner; graph runner gets one more (scratch)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapters")
    return {
        "x": make_flora_adapter(1, tmp),
        "y": make_flora_adapter(2, tmp),
        "z": make_flora_adapter(3, tmp),
        "wide": make_flora_adapter(4, tmp, rank=12),  # grows the banks past capacity 8
    }


def kv_for(model, blocks: int, device: str = "cpu") -> KVTensors:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return KVTensors(
        c.num_hidden_layers, blocks, BS, c.num_key_value_heads, head_dim, torch.float32, device
    )


class Pair:
    """The same steps through an eager runner and a graphed one, each with its own pool
    (same block ids), one served model; on "cuda" the graphs are real CUDA graphs."""

    def __init__(self, adapters, model=None, tol: float = 1e-4, device: str = "cpu") -> None:
        self.model = (make_tiny_llama() if model is None else model).to(device)
        self.tol = tol
        self.serving = ServingModel(self.model, max_slots=4)
        self.serving.load(0, adapters["x"])
        self.serving.load(1, adapters["y"])
        cuda = device == "cuda"
        self.capture = CudaGraphCapture(torch.device(device)) if cuda else RecordedCapture()
        self.eager = PagedRunner(self.model, kv_for(self.model, BLOCKS, device))
        self.graphed = GraphedPagedRunner(
            self.model,
            kv_for(self.model, BLOCKS + 1, device),
            self.serving,
            self.capture,
            scratch_block=BLOCKS,
        )
        self.seqs: dict[str, tuple[list[int], list[int], int | None]] = {}
        self.next_block = 0

    def add(self, name: str, prompt: list[int], slot: int | None) -> None:
        """Prefill (eager in both) and remember the sequence; 8 blocks each."""
        blocks = list(range(self.next_block, self.next_block + 8))
        self.next_block += 8
        self.seqs[name] = (list(prompt), blocks, slot)
        chunks = [ChunkInput(prompt, 0, blocks)]
        slots = [slot] * len(prompt)
        logits = self.step_both(chunks, slots, [len(prompt) - 1], prefill=True)
        self.seqs[name][0].append(int(logits.argmax(-1)))

    def step_both(self, chunks, slots, sample_rows, prefill: bool = False) -> torch.Tensor:
        replays = self.graphed.replays
        want = self.eager.run(chunks, slots, sample_rows, self.serving.set_routing)
        got = self.graphed.run(chunks, slots, sample_rows, self.serving.set_routing)
        assert self.graphed.replays == replays + (0 if prefill else 1)
        torch.testing.assert_close(got, want, rtol=self.tol, atol=self.tol)
        return want

    def decode(self, names: list[str]) -> None:
        chunks, slots = [], []
        for name in names:
            tokens, blocks, slot = self.seqs[name]
            chunks.append(ChunkInput(tokens[-1:], len(tokens) - 1, blocks))
            slots.append(slot)
        logits = self.step_both(chunks, slots, list(range(len(names))))
        for name, token in zip(names, logits.argmax(-1).tolist(), strict=True):
            self.seqs[name][0].append(token)

    def used_kv_equal(self) -> None:
        """Every real block of both pools holds the same keys and values."""
        n = BLOCKS * BS
        for a, b in zip(
            self.eager.kv.keys + self.eager.kv.values,
            self.graphed.kv.keys + self.graphed.kv.values,
            strict=True,
        ):
            # adapters run per row here, one-row or by numba in the eager runner: float32 rounding
            torch.testing.assert_close(b[:n], a[:n], rtol=1e-3, atol=1e-3)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


@pytest.mark.parametrize("device", DEVICES)
def test_graph_logits_match_eager_across_buckets_loads_and_merges(adapters, device) -> None:
    pair = Pair(adapters, device=device)
    prompts = {"a": [5, 6, 7], "b": [9, 10, 11, 12, 13], "c": [20] * 7, "d": [3, 4], "e": [8, 2]}
    slots = {"a": 0, "b": 1, "c": None, "d": 0, "e": None}
    for name, prompt in prompts.items():
        pair.add(name, prompt, slots[name])
    for _ in range(3):
        pair.decode(["a", "b", "c"])  # bucket 4: one padding row, adapters
    pair.decode(["a", "b", "c", "d", "e"])  # bucket 8: three padding rows
    pair.decode(["c"])  # bucket 1, base only
    recorded = pair.capture.captures
    assert {k[0] for k in pair.graphed.graphs} == {1, 4, 8}
    # An adapter loaded between replays (rank within the banks' capacity) is read in place.
    version = pair.serving.layout_version
    pair.serving.load(2, adapters["z"])
    assert pair.serving.layout_version == version
    pair.add("f", [30, 31, 32], 2)
    pair.decode(["a", "f", "c"])
    assert pair.capture.captures == recorded  # no new recording: same (bucket, width, kind)
    # Merged mode: every row on slot 0 replays the base graph over the merged weights.
    pair.serving.merge(0)
    pair.decode(["a", "d"])
    pair.serving.unmerge()
    pair.decode(["a", "d"])
    pair.decode(["a", "b", "c"])
    pair.used_kv_equal()


@pytest.mark.parametrize("device", DEVICES)
def test_bank_growth_drops_the_graphs_and_records_again(adapters, device) -> None:
    pair = Pair(adapters, device=device)
    pair.add("a", [5, 6, 7], 0)
    pair.add("b", [9, 10], 1)
    pair.decode(["a", "b"])
    before = pair.capture.captures
    version = pair.serving.layout_version
    pair.serving.load(1, adapters["wide"])  # rank 12 > capacity 8: banks re-allocated
    assert pair.serving.layout_version != version
    pair.decode(["a", "b"])  # would read the old banks if the graph were kept
    assert pair.capture.captures == before + 1
    pair.used_kv_equal()


def test_padding_rows_write_only_the_scratch_block(adapters) -> None:
    pair = Pair(adapters)
    pair.add("a", [5, 6, 7], 0)
    pair.add("b", [9, 10, 11], None)
    pair.add("c", [4, 4, 4, 4, 4], 1)
    kv = pair.graphed.kv
    scratch = range(BLOCKS * BS, (BLOCKS + 1) * BS)
    for t in kv.keys + kv.values:
        t[scratch.start :].fill_(7.0)  # a sentinel (finite: masked keys still enter SDPA)
    snapshot = [t.clone() for t in kv.keys + kv.values]
    pair.decode(["a", "b", "c"])  # bucket 4: one padding row
    written = {  # the slots the three real tokens write
        blocks[(len(tokens) - 2) // BS] * BS + (len(tokens) - 2) % BS
        for tokens, blocks, _ in pair.seqs.values()
    }
    for old, new in zip(snapshot, kv.keys + kv.values, strict=True):
        changed = set((old != new).any(dim=(1, 2)).nonzero().flatten().tolist())
        # the real tokens' slots, and the padding row's (position 0 of the scratch block)
        assert changed == written | {scratch.start}
    pair.used_kv_equal()


def test_mixed_prefill_steps_and_large_batches_run_eagerly(adapters) -> None:
    pair = Pair(adapters)
    pair.graphed.buckets = (1, 2)
    pair.add("a", [5, 6, 7], 0)
    pair.add("b", [9, 10], 1)
    pair.add("c", [11, 12], None)
    eager = pair.eager.run
    tokens, blocks, _ = pair.seqs["a"]
    mixed = [ChunkInput(tokens[-1:], len(tokens) - 1, blocks), ChunkInput([4, 5], 0, [40])]
    replays = pair.graphed.replays
    want = eager(mixed, [0, None, None], [0, 2], pair.serving.set_routing)
    got = pair.graphed.run(mixed, [0, None, None], [0, 2], pair.serving.set_routing)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert pair.graphed.replays == replays
    three = [ChunkInput(s[0][-1:], len(s[0]) - 1, s[1]) for s in pair.seqs.values()]
    want = eager(three, [0, 1, None], [0, 1, 2], pair.serving.set_routing)
    got = pair.graphed.run(three, [0, 1, None], [0, 1, 2], pair.serving.set_routing)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert pair.graphed.replays == replays  # 3 rows > the largest bucket (2): eager


class FakeCudaGraph:
    """`torch.cuda.CUDAGraph` as `CudaGraphCapture` uses it: the pool it was recorded into."""

    def __init__(self) -> None:
        self.recorded_into, self.replays = "never", 0

    def pool(self) -> tuple[str, int]:
        return ("pool", id(self))

    def replay(self) -> None:
        self.replays += 1


@pytest.fixture
def fake_cuda(monkeypatch) -> list[FakeCudaGraph]:
    """Just enough of `torch.cuda` for `CudaGraphCapture` on the CPU; the graphs made."""
    graphs: list[FakeCudaGraph] = []

    class Stream:
        def wait_stream(self, other) -> None:
            pass

    def make_graph() -> FakeCudaGraph:
        graphs.append(FakeCudaGraph())
        return graphs[-1]

    @contextlib.contextmanager
    def record(graph, pool=None, capture_error_mode=None):  # type: ignore[no-untyped-def]
        graph.recorded_into = pool
        yield

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", make_graph)
    monkeypatch.setattr(torch.cuda, "graph", record)
    return graphs


def test_a_cuda_replay_keeps_the_tensors_of_the_recorded_forward_alive(fake_cuda) -> None:
    """A graph replays raw addresses: a buffer only the forward's closure holds (the
    runner's gather index, mask, step) must live as long as the replay, or the allocator
    hands its memory to other tensors (on an H200: index out of bounds at the first
    replay)."""
    capture = CudaGraphCapture(torch.device("cuda"))

    def make_forward():  # type: ignore[no-untyped-def]
        index = torch.zeros(3)  # held by the closure alone

        def forward() -> None:
            index.add_(1)

        return forward, weakref.ref(index)

    forward, index = make_forward()
    replay = capture.capture(forward)
    del forward
    gc.collect()
    assert index() is not None
    replay()
    assert fake_cuda[0].replays == 1
    del replay
    gc.collect()
    assert index() is None  # and no longer than that


def test_graphs_share_a_pool_until_reset_drops_it(fake_cuda) -> None:
    """Graphs share one memory pool; once the runner drops its graphs the pool dies with
    them and recording into its id fails inside the allocator, so `reset` starts anew."""
    capture = CudaGraphCapture(torch.device("cuda"))
    for _ in range(2):
        capture.capture(lambda: None)
    capture.reset()
    capture.capture(lambda: None)
    first_pool = fake_cuda[0].pool()
    assert [g.recorded_into for g in fake_cuda] == [None, first_pool, None]
    assert capture.captures == 3


def test_the_capability_check_keeps_the_cpu_eager() -> None:
    assert graph_capture_for("auto", torch.device("cpu")) is None
    assert graph_capture_for("off", torch.device("cpu")) is None
    with pytest.raises(ValueError, match="cuda_graphs"):
        graph_capture_for("on", torch.device("cpu"))


def test_engine_v2_with_graphs_matches_independent_references(adapters) -> None:
    refs = {
        "x": merged_reference_model(adapters["x"]),
        "y": merged_reference_model(adapters["y"]),
        None: make_tiny_llama(),
    }
    capture = RecordedCapture()
    engine = make_engine(adapters, graph_capture=capture, merge_after_steps=3)
    runner = engine._stepper.runner  # type: ignore[attr-defined]
    assert isinstance(runner, GraphedPagedRunner)

    async def main():
        async def one(key):
            req = GenerationRequest(key, PROMPTS[key], greedy(10), ADAPTER_OF[key])
            return key, await collect(engine, req)

        return dict(await asyncio_gather(*(one(k) for k in PROMPTS)))

    try:
        results = run(main())
        alone = run(one_more(engine))
        merged = engine._runtime.merged_slot
    finally:
        run(engine.shutdown(5))
    for key, events in results.items():
        assert list(events[-1].token_ids) == greedy_alone(refs[ADAPTER_OF[key]], PROMPTS[key], 10)
    assert list(alone[-1].token_ids) == greedy_alone(refs["x"], PROMPTS["x1"], 48)
    assert merged is not None  # the lone x request ran merged, through the graphs
    assert runner.replays > 10 and capture.captures >= 2


async def one_more(engine):
    """One request alone: its decode runs on the merged slot after 3 steps (its 48-token
    budget pays for the merge)."""
    return await collect(engine, GenerationRequest("x1", PROMPTS["x1"], greedy(48), "x"))


async def asyncio_gather(*aws):
    import asyncio

    return await asyncio.gather(*aws)


def test_engine_cpu_default_is_the_eager_runner(adapters) -> None:
    engine = make_engine(adapters)
    try:
        assert type(engine._stepper.runner) is PagedRunner  # type: ignore[attr-defined]
    finally:
        run(engine.shutdown(5))


@pytest.mark.integration
@pytest.mark.slow
def test_graph_logits_match_eager_on_smollm2(tmp_path) -> None:
    """The real SmolLM2-135M in float32: decode through recorded graphs (buckets with
    padding, adapters, an adapter loaded between replays, merged mode) equals eager."""
    from test_engine_smollm2 import random_adapter

    from flora.models import load

    model = load("smollm2-135m-instruct").model
    adapters = {
        "x": random_adapter(model, 1, tmp_path),
        "y": random_adapter(model, 2, tmp_path),
        "z": random_adapter(model, 3, tmp_path),
    }
    pair = Pair(adapters, model=model, tol=2e-3)
    prompts = {"a": [504, 3458, 314], "b": [1204, 28, 9, 446, 39], "c": [288] * 6}
    for name, slot in zip(prompts, (0, 1, None), strict=True):
        pair.add(name, prompts[name], slot)
    for _ in range(2):
        pair.decode(["a", "b", "c"])  # bucket 4, one padding row
    pair.serving.load(2, adapters["z"])
    pair.add("d", [77, 78], 2)
    pair.decode(["a", "b", "c", "d"])
    pair.serving.merge(0)
    pair.decode(["a"])
    pair.serving.unmerge()
    pair.decode(["a", "d", "c"])
    pair.used_kv_equal()


def test_the_cache_kwarg_is_read_from_the_decoder_signature() -> None:
    from flora_server.engine.paged.runner import cache_kwarg_of

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, **kwargs): ...

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, **kwargs): ...

    assert cache_kwarg_of(Old()) == "past_key_values"
    assert cache_kwarg_of(New()) == "cache"
    # the installed transformers: the name its Llama decoder really takes
    decoder = make_tiny_llama().get_decoder()
    forward = inspect.unwrap(decoder.forward)
    assert cache_kwarg_of(decoder) in forward.__code__.co_varnames
