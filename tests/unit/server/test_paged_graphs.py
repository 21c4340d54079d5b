"""Step graphs (`paged/graphs.py`) on the CPU through `RecordedCapture`, which re-runs the
recorded Python on replay against the same buffers: the graphed runner's logits and KV
writes equal the eager runner's across bucket padding, changing batch sizes, prefill chunks
beside decode rows (at position 0 and after cached blocks, with prompt-score rows), adapter
loads between replays, merged-mode switches and a bank re-allocation; the capability check
keeps the CPU eager; engine v2 with graphs gives the same greedy tokens as independent
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
from flora_server.engine.paged.capture import (
    CudaGraphCapture,
    RecordedCapture,
    graph_capture_for,
)
from flora_server.engine.paged.graphs import DECODE_BUCKETS, GraphedPagedRunner, token_buckets
from flora_server.engine.paged.runner import ChunkInput, KVTensors, PagedRunner, PagedStep
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
        """Prefill (a graph of its own) and remember the sequence; 8 blocks each."""
        blocks = list(range(self.next_block, self.next_block + 8))
        self.next_block += 8
        self.seqs[name] = (list(prompt), blocks, slot)
        chunks = [ChunkInput(prompt, 0, blocks)]
        slots = [slot] * len(prompt)
        logits = self.step_both(chunks, slots, [len(prompt) - 1])
        self.seqs[name][0].append(int(logits.argmax(-1)))

    def step_both(self, chunks, slots, sample_rows, graphed: bool = True) -> torch.Tensor:
        replays = self.graphed.replays
        want = self.eager.run(chunks, slots, sample_rows, self.serving.set_routing)
        got = self.graphed.run(chunks, slots, sample_rows, self.serving.set_routing)
        assert self.graphed.replays == replays + graphed
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
    # decode steps of 1, 3 and 5 rows; prefills of 2, 3, 5 and 7 tokens
    assert {k[0] for k in pair.graphed.graphs} == {1, 2, 4, 8}
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


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_chunks_beside_decode_rows_replay_one_graph(adapters, device) -> None:
    """A step packing decode rows (adapters and base) with prefill chunks: one at position 0,
    one continuing a sequence after its cached blocks (a prefix hit or an earlier chunk)
    that spans a block boundary, with prompt-score rows sampled beside the last tokens.
    The graph reads each token's own position and block table."""
    pair = Pair(adapters, device=device)
    pair.add("a", [5, 6, 7], 0)
    pair.add("b", [9, 10], None)
    pair.add("c", [11, 12, 13, 14, 15, 16], 1)  # its blocks hold positions 0-5
    (ta, ba, _), (tb, bb, _), (tc, bc, _) = (pair.seqs[k] for k in "abc")
    fresh = list(range(pair.next_block, pair.next_block + 8))
    pair.next_block += 8
    chunks = [
        ChunkInput(ta[-1:], len(ta) - 1, ba),
        ChunkInput([3, 1, 4, 1, 5], 0, fresh),  # a new prompt's first chunk, base
        ChunkInput(tb[-1:], len(tb) - 1, bb),
        ChunkInput([*tc[6:], 17, 18, 19], 6, bc),  # positions 6-9: crosses block 1 -> 2
    ]
    slots = [0, None, None, None, None, None, None, 1, 1, 1, 1]
    # the decode rows, the chunk of c's last token; then prompt scores of the new prompt
    sample = [0, 6, 10, 1, 2, 3]
    pair.step_both(chunks, slots, sample)
    # 11 tokens: bucket 16; c's position 9 is in its third block: 4 blocks a row
    assert (16, 4, True) in pair.graphed.graphs
    pair.used_kv_equal()
    # the new prompt's next chunk reads the keys the graph wrote, beside a decode row
    pair.step_both(
        [ChunkInput([9, 2, 6], 5, fresh), ChunkInput(ta[-1:], len(ta) - 1, ba)],
        [None, None, None, 0],
        [2, 3],
    )
    # a middle chunk of a long prompt alone: nothing sampled, the keys written
    assert pair.step_both([ChunkInput([7, 7], 8, fresh)], [None, None], []).shape[0] == 0
    pair.used_kv_equal()


def test_steps_past_the_largest_bucket_run_eagerly(adapters) -> None:
    pair = Pair(adapters)
    pair.graphed.buckets = (1, 2)
    pair.add("a", [5, 6], 0)
    pair.add("b", [9, 10], 1)
    pair.add("c", [11, 12], None)
    eager_steps = pair.graphed.eager_steps
    three = [ChunkInput(s[0][-1:], len(s[0]) - 1, s[1]) for s in pair.seqs.values()]
    pair.step_both(three, [0, 1, None], [0, 1, 2], graphed=False)  # 3 rows > bucket 2
    prefill = [ChunkInput([4, 5, 6], 0, [40])]
    pair.step_both(prefill, [None] * 3, [2], graphed=False)  # 3 tokens > bucket 2
    assert pair.graphed.eager_steps == eager_steps + 2
    pair.used_kv_equal()


def test_steps_sampling_more_rows_than_a_graph_returns_run_eagerly(adapters) -> None:
    """A graph returns the logits of at most `max_samples` rows (the shared buffer's);
    a step scoring a prompt's positions past that runs eagerly, one within it replays."""
    pair = Pair(adapters)
    pair.graphed.max_samples = 4
    pair.step_both([ChunkInput([4, 5, 6, 7, 8], 0, [40, 41])], [None] * 5, [4, 0, 1, 2, 3], False)
    got = pair.step_both([ChunkInput([4, 5, 6, 7, 8], 0, [42, 43])], [0] * 5, [4, 0, 1, 2])
    assert got.shape[0] == 4
    assert pair.graphed._logits is not None and pair.graphed._logits.shape[0] == 4
    pair.used_kv_equal()


class FailingCapture(RecordedCapture):
    """`RecordedCapture` whose recordings fail while `failing` (as a wide shape out of
    device memory would)."""

    failing = False

    def capture(self, forward):  # type: ignore[no-untyped-def]
        if self.failing:
            raise RuntimeError("out of memory (a stand-in)")
        return super().capture(forward)


def test_a_failed_recording_costs_its_shape_only(adapters) -> None:
    """A recording that fails after others succeeded leaves that shape eager (tried once,
    not again) and every other graph serving; a first recording that fails turns graphs
    off (the model cannot be recorded there)."""
    pair = Pair(adapters)
    capture = pair.graphed.capture = FailingCapture()
    pair.add("a", [5, 6, 7], 0)  # 3 tokens: bucket 4, recorded
    eager = pair.graphed.eager_steps
    capture.failing = True
    pair.step_both([ChunkInput([1, 2, 3, 4, 5, 6], 0, [50, 51])], [None] * 6, [5], False)
    capture.failing = False
    pair.step_both([ChunkInput([1, 2, 3, 4, 5, 7], 0, [52, 53])], [None] * 6, [5], False)
    assert pair.graphed.eager_steps == eager + 2  # bucket 8: failed once, not tried again
    assert capture.captures == 1
    pair.decode(["a"])  # bucket 1: recorded and replayed
    assert capture.captures == 2
    # a bank grown to a larger rank drops every graph and their pool: the failed shape is
    # tried again, and records now
    pair.serving.load(1, adapters["wide"])
    pair.step_both([ChunkInput([1, 2, 3, 4, 5, 8], 0, [54, 55])], [None] * 6, [5])
    assert capture.captures == 3
    pair.used_kv_equal()

    off = Pair(adapters)
    capture = off.graphed.capture = FailingCapture()
    capture.failing = True
    off.step_both([ChunkInput([5, 6, 7], 0, [0, 1])], [0] * 3, [2], False)
    capture.failing = False
    off.step_both([ChunkInput([8], 3, [0, 1])], [0], [0], False)
    assert off.graphed.eager_steps == 2 and off.graphed.graphs == {} and capture.captures == 0


def test_token_buckets_end_at_the_step_budget() -> None:
    assert token_buckets(512) == (*DECODE_BUCKETS, 192, 256, 384, 512)
    assert token_buckets(2048)[-5:] == (512, 768, 1024, 1536, 2048)
    assert token_buckets(100) == (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 100)
    assert token_buckets(128) == DECODE_BUCKETS
    assert token_buckets(1) == (1,)


def test_a_key_index_past_the_limit_runs_eagerly(adapters, monkeypatch) -> None:
    """A step whose tokens x key positions exceed the gather limit runs eagerly (its
    index would not fit the graphs' pool); without the fused attention kernel the limit
    is the gathered keys' bytes."""
    import flora_server.engine.paged.graphs as graphs

    pair = Pair(adapters)
    pair.add("a", [5, 6, 7], 0)
    # 1 token x 1 block of 4 positions fits 4 entries; 2 tokens do not
    monkeypatch.setattr(graphs, "MAX_GATHER", 4)
    pair.step_both([ChunkInput([8, 9], 0, [50])], [None, None], [1], graphed=False)
    monkeypatch.setattr(graphs, "MAX_GATHER", 1 << 24)
    c = pair.model.config
    head_dim = c.hidden_size // c.num_attention_heads
    per_key = 2 * c.num_key_value_heads * head_dim * 4  # a key and a value, float32
    assert pair.graphed._kv_bytes_per_key == per_key
    monkeypatch.setattr(graphs, "MAX_GATHERED_KV_BYTES", 2 * 4 * per_key - 1)
    pair.step_both([ChunkInput([8, 9], 0, [50])], [None, None], [1], graphed=False)
    monkeypatch.setattr(graphs, "MAX_GATHERED_KV_BYTES", 2 * 4 * per_key)
    pair.step_both([ChunkInput([8, 9], 0, [50])], [None, None], [1])


def test_a_graph_holds_no_key_index_between_replays(adapters) -> None:
    """The gather index, mask and write slots a recorded forward computes are its
    intermediates: after the forward nothing holds them, so in CUDA graphs their memory
    goes back to the shared pool instead of staying reserved per graph."""
    pair = Pair(adapters)
    pair.add("a", [5, 6, 7], 0)
    pair.decode(["a"])
    assert len(pair.graphed.graphs) == 2
    for graph in pair.graphed.graphs.values():
        cells = [c.cell_contents for c in graph.replay.__closure__ or ()]  # type: ignore[attr-defined]
        steps = [c for c in cells if isinstance(c, PagedStep)]
        assert len(steps) == 1
        assert steps[0].write is None and steps[0].decode == {}


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
        hits = engine.pool.hits
        # b1 again: its first 4 tokens' block is cached, so its prefill starts at position 4
        again = run(collect(engine, GenerationRequest("b1", PROMPTS["b1"], greedy(10), None)))
        assert engine.pool.hits > hits
        alone = run(one_more(engine))
        merged = engine._runtime.merged_slot
    finally:
        run(engine.shutdown(5))
    for key, events in results.items():
        assert list(events[-1].token_ids) == greedy_alone(refs[ADAPTER_OF[key]], PROMPTS[key], 10)
    assert list(again[-1].token_ids) == greedy_alone(refs[None], PROMPTS["b1"], 10)
    assert list(alone[-1].token_ids) == greedy_alone(refs["x"], PROMPTS["x1"], 48)
    assert merged is not None  # the lone x request ran merged, through the graphs
    # every step replayed a graph: prefill chunks (8-token budget, b1's 7-token prompt
    # packed beside decode rows) and the prefix-hit prefill too
    assert runner.eager_steps == 0
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
