"""Engine v2 on the real SmolLM2-135M-Instruct (float32, CPU): a row's greedy tokens in a
mixed packed step (adapters, base rows, prefix-cache hits, chunked prefill, preemption)
equal the same request alone, computed independently by transformers' greedy `generate`
(adapters applied and merged by flora itself)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from test_engine_smollm2 import random_adapter
from test_paged_engine import settled_stats
from tiny_engine import DictSource

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]
STEPS = 6
SYSTEM = "You are a concise assistant for a travel company. Answer in one short sentence."
QUESTIONS = {
    "x1": ("x", "What is the capital of France?"),
    "x2": ("x", "Name a river in Spain."),
    "y1": ("y", "Name a colour."),
    "b1": (None, "Say hi."),
    "b2": (None, "What is two plus two?"),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import flora
    from flora.adapter import apply_adapter, remove_adapter
    from flora.models import load

    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("paged")
    ref = load("smollm2-135m-instruct")
    tok = ref.preprocessor
    adapters = {"x": random_adapter(ref.model, 1, tmp), "y": random_adapter(ref.model, 2, tmp)}

    def encode(text: str) -> list[int]:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
        chat = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tok.encode(chat, add_special_tokens=False)

    prompts = {key: encode(text) for key, (_, text) in QUESTIONS.items()}

    def greedy_alone(model, prompt: list[int], steps: int) -> list[int]:
        # transformers' own greedy generate: independent of both engines' batching.
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=steps, min_new_tokens=steps, do_sample=False
        )
        return out[0, len(prompt) :].tolist()

    def expected(adapter, prompt: list[int]) -> list[int]:
        if adapter is None:
            return greedy_alone(ref.model, prompt, STEPS)
        apply_adapter(ref.model, adapter)
        flora.merge(ref.model)
        try:
            return greedy_alone(ref.model, prompt, STEPS)
        finally:
            remove_adapter(ref.model)

    want = {
        k: expected(adapters.get(a) if a else None, prompts[k]) for k, (a, _) in QUESTIONS.items()
    }

    def logprobs(adapter, ids: list[int]) -> torch.Tensor:
        """[len(ids) - 1, V]: one full forward, no cache (adapter merged by flora)."""
        if adapter is not None:
            apply_adapter(ref.model, adapter)
            flora.merge(ref.model)
        try:
            with torch.no_grad():
                return ref.model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
        finally:
            if adapter is not None:
                remove_adapter(ref.model)

    return {
        "adapters": adapters,
        "prompts": prompts,
        "want": want,
        "expected": expected,
        "logprobs": logprobs,
    }


def run_engine(engine, jobs):
    """jobs: list of (adapter_id, prompt) run concurrently; returns their token ids."""
    from flora_server.engine.protocol import GenerationRequest, SamplingParams

    async def main():
        while not engine.ready:
            await asyncio.sleep(0.05)

        async def one(i, adapter_id, prompt):
            req = GenerationRequest(
                str(i), prompt, SamplingParams(max_new_tokens=STEPS), adapter_id
            )
            events = [e async for e in engine.generate(req)]
            return list(events[-1].token_ids)

        return await asyncio.gather(*(one(i, a, p) for i, (a, p) in enumerate(jobs)))

    return asyncio.run(main())


def make_engine(adapters, **kwargs):
    from flora.models import load
    from flora_server.engine.paged.engine import PagedLLMEngine

    kwargs = {"kv_cache_bytes": 64 << 20, **kwargs}
    engine = PagedLLMEngine(load("smollm2-135m-instruct"), DictSource(adapters), **kwargs)
    engine.start()
    return engine


def test_mixed_adapters_prefix_hits_and_chunks_equal_each_alone(world) -> None:
    adapters, prompts, want = world["adapters"], world["prompts"], world["want"]
    assert len(prompts["x1"]) > 24  # longer than the step budget: prefilled in chunks
    engine = make_engine(
        adapters, kv_block_size=4, max_num_batched_tokens=24, merge_after_steps=None
    )
    try:
        # Warm the prefix cache with the shared system prompt under x and the base.
        warm = run_engine(engine, [("x", prompts["x1"]), (None, prompts["b1"])])
        assert warm == [want["x1"], want["b1"]]
        hits_before = engine.stats().prefix_cache_hits
        keys = ["x2", "y1", "b2", "x1", "b1"]
        got = run_engine(engine, [(QUESTIONS[k][0], prompts[k]) for k in keys])
        stats = settled_stats(engine)
    finally:
        asyncio.run(engine.shutdown(5))
    assert dict(zip(keys, got, strict=True)) == {k: want[k] for k in keys}
    assert want["x1"] != want["b1"] or want["x2"] != want["b2"]  # adapters change outputs
    # x2, b2, x1, b1 reuse the system prompt's blocks (y1 cannot: no y blocks cached).
    assert stats.prefix_cache_hits - hits_before >= 4 * (len(SYSTEM) // 8)
    assert stats.kv_cache_usage == 0.0  # every block released once requests finished


def test_overwritten_adapter_never_reuses_old_blocks(world) -> None:
    adapters, prompts = world["adapters"], world["prompts"]
    source_adapters = {"x": adapters["x"]}
    engine = make_engine(source_adapters, kv_block_size=4, max_num_batched_tokens=64)
    try:
        assert run_engine(engine, [("x", prompts["x1"])]) == [world["want"]["x1"]]
        hits = engine.stats().prefix_cache_hits
        # Same id, new content (y's weights): its blocks must not be reused.
        engine.cache._source.adapters["x"] = adapters["y"]  # type: ignore[attr-defined]
        engine.invalidate_adapter("x")
        got = run_engine(engine, [("x", prompts["x1"])])
        assert engine.stats().prefix_cache_hits == hits
        # ... whereas the unchanged content does hit.
        run_engine(engine, [("x", prompts["x1"])])
        assert engine.stats().prefix_cache_hits > hits
    finally:
        asyncio.run(engine.shutdown(5))
    assert got == [world["expected"](adapters["y"], prompts["x1"])]


def test_pool_exhaustion_waits_or_preempts_and_finishes_exactly(world) -> None:
    from flora_server.engine.paged.runner import KVTensors

    adapters, prompts, want = world["adapters"], world["prompts"], world["want"]
    per_token = KVTensors.bytes_per_token(
        type(
            "C",
            (),
            {
                "num_attention_heads": 9,
                "num_key_value_heads": 3,
                "head_dim": 64,
                "num_hidden_layers": 30,
                "hidden_size": 576,
            },
        )(),
        torch.float32,
    )
    longest = max(len(p) for p in prompts.values()) + STEPS
    blocks = -(-longest // 8) + 2  # one request fits; three at once cannot
    engine = make_engine(
        adapters, kv_block_size=8, kv_cache_bytes=blocks * 8 * per_token, max_num_batched_tokens=256
    )
    keys = ["x1", "b1", "y1", "x2"]
    try:
        got = run_engine(engine, [(QUESTIONS[k][0], prompts[k]) for k in keys])
        preemptions = engine._stepper.preemptions  # type: ignore[attr-defined]
    finally:
        asyncio.run(engine.shutdown(5))
    assert engine.pool.num_blocks == blocks
    assert dict(zip(keys, got, strict=True)) == {k: want[k] for k in keys}
    assert preemptions >= 1


def test_prompt_logprobs_over_chunks_equal_a_full_forward(world) -> None:
    """Prompt logprobs (echo / decoder_input_details) gathered from 16-token prefill chunks
    packed beside another adapter's request equal one full forward of the prompt."""
    from flora_server.engine.protocol import GenerationRequest, SamplingParams

    adapters, prompts, want = world["adapters"], world["prompts"], world["want"]
    engine = make_engine(
        adapters, kv_block_size=4, max_num_batched_tokens=16, merge_after_steps=None
    )
    params = SamplingParams(max_new_tokens=STEPS, prompt_logprobs=True, top_logprobs=3)

    async def main():
        while not engine.ready:
            await asyncio.sleep(0.05)

        async def one(req):
            return [e async for e in engine.generate(req)]

        scored = GenerationRequest("s", prompts["x1"], params, "x")
        other = GenerationRequest("o", prompts["y1"], SamplingParams(max_new_tokens=STEPS), "y")
        return await asyncio.gather(one(scored), one(other))

    try:
        scored, other = asyncio.run(main())
    finally:
        asyncio.run(engine.shutdown(5))
    prompt = prompts["x1"]
    assert list(scored[-1].token_ids) == want["x1"]
    assert list(other[-1].token_ids) == want["y1"]
    ref = world["logprobs"](adapters["x"], prompt)
    entries = scored[-1].prompt_logprobs
    assert [e.token_id for e in entries] == prompt and entries[0].logprob is None
    got = torch.tensor([e.logprob for e in entries[1:]])
    want_lp = ref.gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(got, want_lp, atol=1e-4, rtol=0)
    assert [[t.token_id for t in e.top] for e in entries[1:]] == ref.topk(3).indices.tolist()
