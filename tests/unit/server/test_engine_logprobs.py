"""Logprobs the engine reports (prompt tokens, generated tokens, top-n alternatives) and
`ignore_eos`, on a tiny random Llama with a real flora adapter. The reference is one full
forward pass of the prompt and the generated tokens through a fresh model with the adapter
merged by flora itself."""

from __future__ import annotations

import asyncio

import pytest
import torch
from test_engine import collect, make_engine, run
from tiny_engine import make_flora_adapter, make_tiny_llama, merged_reference_model

from flora_server.engine.protocol import GenerationRequest, SamplingParams

pytestmark = pytest.mark.timeout(120)

# 13 tokens: engine v2 (step budget 8) scores it over two prefill chunks.
PROMPT = [5, 17, 33, 60, 8, 44, 71, 12, 90, 3, 27, 64, 50]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return make_flora_adapter(3, tmp_path_factory.mktemp("adapters"))


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, V]: row t is the distribution of token t + 1 given ids[:t + 1]."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)


def test_prompt_and_top_logprobs_match_a_full_forward(adapter, engine_kind) -> None:
    engine = make_engine({"x": adapter}, kind=engine_kind, merge_after_steps=None)
    params = SamplingParams(max_new_tokens=5, logprobs=True, top_logprobs=3, prompt_logprobs=True)

    async def both():
        # A plain base row is admitted with the scored row (v1 prefills them separately,
        # v2 packs their chunks into the same steps).
        scored = GenerationRequest("s", PROMPT, params, "x")
        plain = GenerationRequest("p", [9, 70, 3], SamplingParams(max_new_tokens=5), None)
        return await asyncio.gather(collect(engine, scored), collect(engine, plain))

    try:
        events, plain = run(both())
    finally:
        run(engine.shutdown(5))
    finish = events[-1]
    generated = list(finish.token_ids)
    ref = reference_logprobs(merged_reference_model(adapter), PROMPT + generated)
    n = len(PROMPT)
    # Prompt tokens: the first has no logprob, token j has log p(ids[j] | ids[:j]).
    assert [p.token_id for p in finish.prompt_logprobs] == PROMPT
    assert finish.prompt_logprobs[0].logprob is None
    got = torch.tensor([p.logprob for p in finish.prompt_logprobs[1:]])
    want = ref[: n - 1].gather(1, torch.tensor(PROMPT[1:]).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    for j, p in enumerate(finish.prompt_logprobs[1:]):
        assert [t.token_id for t in p.top] == ref[j].topk(3).indices.tolist()
    # Generated tokens: greedy, so each is its position's most likely token.
    for k, event in enumerate(events[:-1]):
        row = ref[n - 1 + k]
        assert event.logprob == pytest.approx(row[generated[k]].item(), abs=1e-4)
        assert [t.token_id for t in event.top_logprobs] == row.topk(3).indices.tolist()
        assert event.top_logprobs[0].token_id == generated[k]
    # The neighbour asked for nothing and got nothing.
    assert plain[-1].prompt_logprobs == () and plain[0].top_logprobs == ()
    assert plain[0].logprob is None
    greedy_base = make_tiny_llama()
    ids = [9, 70, 3, *plain[-1].token_ids]
    assert reference_logprobs(greedy_base, ids)[2:].argmax(-1).tolist() == ids[3:]


def test_ignore_eos_generates_through_eos(adapter, engine_kind) -> None:
    engine = make_engine({"x": adapter}, kind=engine_kind)
    try:
        first = run(collect(engine, GenerationRequest("a", PROMPT, SamplingParams(1))))
        eos = first[-1].token_ids[0]
        engine._stepper.eos_ids = {eos}  # the first greedy token is now an EOS token
        stopped = run(collect(engine, GenerationRequest("b", PROMPT, SamplingParams(6))))
        params = SamplingParams(6, ignore_eos=True)
        through = run(collect(engine, GenerationRequest("c", PROMPT, params)))
    finally:
        run(engine.shutdown(5))
    assert stopped[-1].reason == "eos" and stopped[-1].generated_tokens == 1
    assert stopped[0].special
    assert through[-1].reason == "length" and through[-1].generated_tokens == 6
    assert through[0].special and through[0].token_id == eos
