"""Engine v2 (`PagedLLMEngine`) end to end on the tiny random Llama with real flora
adapters: exactness against independent references, merged mode, cancellation, deadlines,
the pool's 4xx and stats, and its selection by the `engine` setting."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from test_engine import ADAPTER_OF, PROMPTS, collect, greedy, run
from test_engine_batch import greedy_alone
from tiny_engine import (
    DictSource,
    TinyLoaded,
    make_char_tokenizer,
    make_tiny_llama,
)

from flora_server.engine.llm_engine import InvalidRequestError
from flora_server.engine.paged.engine import PagedLLMEngine
from flora_server.engine.protocol import FinishEvent, GenerationRequest

pytestmark = pytest.mark.timeout(120)
SHARED = [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]  # a "system prompt": 3 blocks of 4


def make_engine(adapters, model=None, **kwargs) -> PagedLLMEngine:
    """A started engine v2 over `model` (default: the tiny Llama), blocks of 4, a step
    budget of 8 tokens."""
    torch.manual_seed(0)
    model = make_tiny_llama() if model is None else model
    loaded = TinyLoaded(model=model, preprocessor=make_char_tokenizer())
    kwargs = {"kv_block_size": 4, "max_num_batched_tokens": 8, "kv_cache_bytes": 1 << 20, **kwargs}
    engine = PagedLLMEngine(loaded, DictSource(adapters), **kwargs)
    engine.start()
    deadline = time.monotonic() + 30
    while not engine.ready:
        assert time.monotonic() < deadline, "engine did not become ready"
        time.sleep(0.01)
    return engine


def settled_stats(engine):
    """Stats once the worker has published the step that finished the last request."""
    for _ in range(200):
        stats = engine.stats()
        if stats.running == 0 and stats.kv_cache_usage == 0.0:
            break
        time.sleep(0.01)
    return stats


@pytest.mark.parametrize("merge_after_steps", [None, 2])
def test_mixed_prefix_hits_and_chunks_match_independent_references(
    adapters, refs, merge_after_steps
) -> None:
    steps = 8 if merge_after_steps is None else 40  # budgets that pay for merges
    engine = make_engine(adapters, merge_after_steps=merge_after_steps)
    prompts = {k: SHARED + p for k, p in PROMPTS.items()}  # all longer than the budget of 8

    async def mixed():
        async def one(key, delay):
            await asyncio.sleep(delay)
            req = GenerationRequest(key, prompts[key], greedy(steps), ADAPTER_OF[key])
            return key, await collect(engine, req)

        first = await one("x1", 0)  # warms x's and nothing else's prefix blocks
        delays = {"y1": 0, "b1": 0, "x2": 0.02, "b2": 0.04, "x1": 0.06}
        return first, dict(await asyncio.gather(*(one(k, d) for k, d in delays.items())))

    try:
        (_, first), results = run(mixed())
        stats = settled_stats(engine)
    finally:
        run(engine.shutdown(5))
    for key, events in [("x1", first), *results.items()]:
        expected = greedy_alone(refs[ADAPTER_OF[key]], prompts[key], steps)
        assert list(events[-1].token_ids) == expected, key
    # x2 and the second x1 reuse x's 3 shared blocks (b1, b2 may reuse each other's).
    assert stats.prefix_cache_hits >= 2 * len(SHARED)
    assert stats.prefix_cache_queries == sum(len(p) for p in prompts.values()) + len(prompts["x1"])
    assert stats.kv_cache_usage == 0.0 and stats.running == 0


def test_prompt_logprobs_compute_every_position_and_still_fill_the_cache(adapters, refs) -> None:
    """A request asking for prompt logprobs reads no cached block (each prompt position
    needs its logits) but caches the blocks it computes; its values equal a full forward
    of the merged reference, whether the cache held its prefix or not."""
    from flora_server.engine.protocol import SamplingParams

    prompt = SHARED + PROMPTS["x1"]  # 17 tokens: 3 prefill chunks at a budget of 8
    scored = SamplingParams(max_new_tokens=3, prompt_logprobs=True, top_logprobs=2)
    engine = make_engine(adapters, merge_after_steps=None)
    try:
        first = run(collect(engine, GenerationRequest("s1", prompt, scored, "x")))
        after_first = settled_stats(engine)
        second = run(collect(engine, GenerationRequest("s2", prompt, scored, "x")))
        after_second = settled_stats(engine)
        plain = run(collect(engine, GenerationRequest("p", prompt, greedy(3), "x")))
        after_plain = settled_stats(engine)
    finally:
        run(engine.shutdown(5))
    assert after_first.prefix_cache_hits == after_second.prefix_cache_hits == 0
    # The plain request reuses the 4 full blocks the scored ones wrote.
    assert after_plain.prefix_cache_hits == 16
    with torch.no_grad():
        ref = refs["x"](torch.tensor([prompt])).logits[0, :-1].log_softmax(-1)
    want = ref.gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1)
    for events in (first, second):
        entries = events[-1].prompt_logprobs
        assert [e.token_id for e in entries] == prompt and entries[0].logprob is None
        got = torch.tensor([e.logprob for e in entries[1:]])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        assert [[t.token_id for t in e.top] for e in entries[1:]] == ref.topk(2).indices.tolist()
    assert first[-1].token_ids == second[-1].token_ids == plain[-1].token_ids
    assert plain[-1].prompt_logprobs == ()


def test_cancel_and_deadline_release_blocks(adapters) -> None:
    engine = make_engine(adapters)

    async def main():
        long = GenerationRequest("c", PROMPTS["b1"], greedy(200), None)
        stream = engine.generate(long)
        await stream.__anext__()  # first token: the row holds blocks now
        assert engine.pool.num_used > 0  # read directly: stats are published after the step
        await stream.aclose()
        expired = GenerationRequest("d", PROMPTS["x1"], greedy(200), "x", time.monotonic() + 0.05)
        events = [e async for e in engine.generate(expired)]
        return events

    try:
        events = run(main())
        usage = settled_stats(engine).kv_cache_usage
    finally:
        run(engine.shutdown(5))
    assert isinstance(events[-1], FinishEvent) and events[-1].reason == "deadline"
    assert usage == 0.0


def test_a_pool_smaller_than_the_context_is_the_context_length(adapters, caplog) -> None:
    """What the routes check a request against (and /info reports): a prompt beyond the
    pool is refused, max_new_tokens is capped to what fits."""
    # 4 blocks of 4 tokens: 16 positions in all.
    loaded = TinyLoaded(model=make_tiny_llama(), preprocessor=make_char_tokenizer())
    bytes_per_token = 2 * 2 * 2 * 16 * 4  # K+V, 2 layers, 2 KV heads, head dim 16, float32
    engine = PagedLLMEngine(
        loaded, DictSource(adapters), kv_block_size=4, kv_cache_bytes=16 * bytes_per_token
    )
    engine.start()
    try:

        async def main():
            while not engine.ready:
                await asyncio.sleep(0.01)
            assert engine.stats().kv_capacity_tokens == 16  # what /info reports
            with pytest.raises(InvalidRequestError, match="context length is 16"):
                engine.generate(GenerationRequest("a", list(range(3, 19)), greedy(4)))
            req = GenerationRequest("b", list(range(3, 13)), greedy(50))
            return [e async for e in engine.generate(req)]

        events = run(main())
    finally:
        run(engine.shutdown(5))
    assert engine.pool.num_blocks == 4
    assert engine.context_length == 16 < make_tiny_llama().config.max_position_embeddings
    assert "KV cache holds 16 tokens" in caplog.text
    assert events[-1].generated_tokens == 6 and events[-1].reason == "length"


def test_engine_setting_selects_v2(adapters) -> None:
    from flora_server.bootstrap import llm_engine
    from flora_server.metrics import ServerMetrics
    from flora_server.settings import Settings

    loaded = TinyLoaded(model=make_tiny_llama(), preprocessor=make_char_tokenizer())
    settings = Settings(engine="v2", kv_cache_bytes=1 << 20, kv_block_size=8)
    engine = llm_engine(loaded, settings, DictSource(adapters), ServerMetrics())
    assert isinstance(engine, PagedLLMEngine)
    assert engine.pool.block_size == 8
    assert engine.pool.num_blocks == (1 << 20) // (8 * 2 * 2 * 2 * 16 * 4)
    assert Settings().engine == "v2"  # the default


def test_a_model_v2_cannot_serve_falls_back_to_v1_unless_v2_was_asked_for(caplog) -> None:
    """Sliding-window models are served by v2; one with attention logit soft-capping
    (Gemma2) is not (`attention_windows`), and goes to v1 under the default setting."""
    from test_paged_windows import DIMS as dims
    from transformers import Gemma2Config, MistralConfig, MistralForCausalLM

    from flora_server.bootstrap import text_engine
    from flora_server.settings import Settings

    sliding = TinyLoaded(
        model=MistralForCausalLM(MistralConfig(sliding_window=16, **dims)), preprocessor=None
    )
    softcapped = torch.nn.Module()
    softcapped.config = Gemma2Config(**dims)
    capped = TinyLoaded(model=softcapped, preprocessor=None, name="tiny-gemma2")
    full = TinyLoaded(model=make_tiny_llama(), preprocessor=None)
    with caplog.at_level("INFO", logger="flora_server.bootstrap"):
        assert text_engine(capped, Settings()) == "v1"
    assert "serving it with engine v1" in caplog.text and "soft-capping" in caplog.text
    with pytest.raises(ValueError, match=r"attention logit soft-capping.*--engine v1"):
        text_engine(capped, Settings(engine="v2"))
    assert text_engine(capped, Settings(engine="v1")) == "v1"
    assert text_engine(sliding, Settings()) == "v2"
    assert text_engine(sliding, Settings(engine="v2")) == "v2"
    assert text_engine(full, Settings()) == "v2"
    assert text_engine(full, Settings(engine="v1")) == "v1"


def test_prefix_cache_counters_are_exported() -> None:
    from flora_server.engine.protocol import EngineStats
    from flora_server.metrics import ServerMetrics

    metrics = ServerMetrics()
    stats = EngineStats(1, 0, (), (), 8, "base", prefix_cache_queries=120, prefix_cache_hits=48)
    metrics.bind_engine_stats(lambda: stats)
    text = metrics.render().decode()
    assert "flora_prefix_cache_queries_total 120.0" in text
    assert "flora_prefix_cache_hits_total 48.0" in text


def test_decode_padding_never_reads_another_sequences_kv() -> None:
    """Decode rows are padded to the longest context; the padding reads the pool's zero pad
    slot, so a non-finite value in a block of some other sequence (an adapter that
    overflowed) cannot reach a row's output through 0 * NaN."""
    from flora_server.engine.paged.runner import ChunkInput, KVTensors, PagedRunner

    model = make_tiny_llama()
    kv = KVTensors(2, 4, 4, 2, 16, torch.float32, "cpu")  # 4 blocks of 4
    runner = PagedRunner(model, kv)

    def no_routing(slots):
        return None

    short, long = [5, 17, 33], [40, 41, 42, 43, 44, 45, 46]
    runner.run([ChunkInput(short, 0, [1])], [None] * 3, [2], no_routing)
    runner.run([ChunkInput(long, 0, [2, 3])], [None] * 7, [6], no_routing)
    for layer in range(2):  # block 0: another sequence's NaN keys and values
        kv.keys[layer][:4] = float("nan")
        kv.values[layer][:4] = float("nan")
    alone = runner.run([ChunkInput([60], 3, [1])], [None], [0], no_routing)
    both = runner.run(
        [ChunkInput([60], 3, [1]), ChunkInput([61], 7, [2, 3])], [None, None], [0, 1], no_routing
    )
    assert torch.isfinite(both).all()
    torch.testing.assert_close(both[0], alone[0], atol=1e-5, rtol=0)
