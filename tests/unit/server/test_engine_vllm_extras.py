"""vLLM's sampling extras in the engines. `min_p`: a sampled row with min_p 1 keeps only
its most likely token, so it generates the greedy tokens. `allowed_token_ids`: a row
generates only those (the argmax among them). `min_tokens`, in both engines and
engine v2's pipelined decode (which must not take such a row's argmax on the device): until
a row has generated that many tokens, EOS and its stop tokens are not picked and its stop
sequences do not end it. On the tiny Llama with a real flora adapter; the reference is
plain full forwards of a fresh model with the adapter merged by flora, taking the argmax
among the tokens not held."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import torch
from test_engine import PROMPTS, collect, make_engine, run
from test_paged_ahead import graphed, stepper_of
from tiny_engine import make_char_tokenizer, make_tiny_llama, merged_reference_model

from flora_server.engine.protocol import GenerationRequest, SamplingParams

pytestmark = pytest.mark.timeout(180)


def greedy_held(
    model, prompt: list[int], steps: int, ends: set[int], min_tokens: int, only=None
) -> list[int]:
    """Greedy tokens that end at the first token of `ends`, none of which may be picked
    among the first `min_tokens`, and all of them among `only` when given (full forwards,
    no cache)."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            if only is not None:
                keep = torch.zeros_like(logits, dtype=torch.bool)
                keep[list(only)] = True
                logits[~keep] = float("-inf")
            if len(out) < min_tokens:
                logits[list(ends)] = float("-inf")
            token = int(logits.argmax())
            out.append(token)
            ids.append(token)
            if token in ends:
                break
    return out


@pytest.fixture(params=["v1", "v2", "v2-pipelined"])
def kind(request) -> str:
    return request.param


def engine_of(kind: str, adapters):
    if kind == "v2-pipelined":
        return graphed(adapters)
    return make_engine(adapters, kind=kind, merge_after_steps=None)


def test_min_tokens_holds_eos_and_stop_tokens_back(adapters, kind) -> None:
    ref = merged_reference_model(adapters["x"])
    prompt = PROMPTS["x1"]
    natural = greedy_held(ref, prompt, 8, set(), 0)
    # EOS and the stop token are tokens this row picks early: without min_tokens it ends at
    # its 2nd token, with min_tokens it goes on, choosing its next best tokens, and ends at
    # the first of them after min_tokens.
    eos, stop = natural[1], natural[0]
    engine = engine_of(kind, adapters)
    stepper_of(engine).eos_ids = {eos}

    async def main():
        plain = SamplingParams(max_new_tokens=10)
        held = replace(plain, min_tokens=4)
        stop_held = replace(plain, min_tokens=3, ignore_eos=True, stop_token_ids=(stop,))
        return await asyncio.gather(
            collect(engine, GenerationRequest("a", prompt, plain, "x")),
            collect(engine, GenerationRequest("b", prompt, held, "x")),
            collect(engine, GenerationRequest("c", prompt, stop_held, "x")),
            collect(engine, GenerationRequest("d", PROMPTS["b2"], plain, None)),
        )

    try:
        ended, held, stop_held, neighbour = run(main())
    finally:
        run(engine.shutdown(5))
    assert ended[-1].reason == "eos" and list(ended[-1].token_ids) == natural[:2]
    want = greedy_held(ref, prompt, 10, {eos}, 4)
    assert list(held[-1].token_ids) == want and len(want) > 4
    assert held[-1].reason == ("eos" if want[-1] == eos else "length")
    # ignore_eos: EOS is a token like any other; the stop token is held back for 3 tokens.
    want = greedy_held(ref, prompt, 10, {stop}, 3)
    assert list(stop_held[-1].token_ids) == want
    assert stop_held[-1].reason == ("stop" if want[-1] == stop else "length")
    base = greedy_held(make_tiny_llama(), PROMPTS["b2"], 10, {eos}, 0)
    assert list(neighbour[-1].token_ids) == base


def test_min_tokens_suspends_stop_sequences(kind) -> None:
    """A stop sequence in the first min_tokens tokens' text does not end the request; the
    first one ending in a later token's text does, including one that began earlier."""
    decode = make_char_tokenizer().decode
    params = SamplingParams(max_new_tokens=12)  # y1's text repeats: "EkEkEk`8Ek`8"
    engine = engine_of(kind, {})
    k = 4
    try:
        base = run(collect(engine, GenerationRequest("a", PROMPTS["y1"], params)))
        ids = list(base[-1].token_ids)
        text = base[-1].generated_text
        floor = len(decode(ids[:k], skip_special_tokens=True))  # the first k tokens' text
        repeated = next(c for c in text[:floor] if c in text[floor:])
        spanning = text[floor - 1 : floor + 1]
        got = {
            stop: run(
                collect(
                    engine,
                    GenerationRequest(
                        "b", PROMPTS["y1"], replace(params, stop=(stop,), min_tokens=k)
                    ),
                )
            )[-1]
            for stop in (repeated, spanning)
        }
    finally:
        run(engine.shutdown(5))
    assert base[-1].reason == "length" and text.startswith(repeated)  # else "" at once
    assert got[repeated].reason == "stop"
    assert got[repeated].generated_text == text[: text.index(repeated, floor)]
    assert got[spanning].reason == "stop"
    assert got[spanning].generated_text == text[: text.index(spanning, floor - 1)]


def test_min_p_one_samples_the_greedy_tokens(adapters, kind) -> None:
    ref = merged_reference_model(adapters["x"])
    engine = engine_of(kind, adapters)
    sampled = SamplingParams(max_new_tokens=8, do_sample=True, temperature=1.5, seed=7)
    try:
        kept = run(
            collect(engine, GenerationRequest("a", PROMPTS["x1"], replace(sampled, min_p=1.0), "x"))
        )
        free = run(collect(engine, GenerationRequest("b", PROMPTS["x1"], sampled, "x")))
    finally:
        run(engine.shutdown(5))
    greedy = greedy_held(ref, PROMPTS["x1"], 8, set(), 0)
    assert list(kept[-1].token_ids) == greedy
    assert list(free[-1].token_ids) != greedy  # at temperature 1.5 the draws differ


def test_allowed_token_ids_are_the_only_tokens_generated(adapters, kind) -> None:
    from flora_server.engine.protocol import InvalidRequestError

    ref = merged_reference_model(adapters["x"])
    natural = greedy_held(ref, PROMPTS["x1"], 6, set(), 0)
    only = sorted({5, 17, 40, 41} - set(natural[:1]))  # the greedy first token is not among them
    engine = engine_of(kind, adapters)
    params = SamplingParams(max_new_tokens=6, allowed_token_ids=tuple(only))
    try:
        held = run(collect(engine, GenerationRequest("a", PROMPTS["x1"], params, "x")))
        free = run(
            collect(
                engine, GenerationRequest("b", PROMPTS["b2"], replace(params, allowed_token_ids=()))
            )
        )
        # a stop id beyond the vocabulary never occurs (vLLM accepts it); held back by
        # min_tokens it must not index the mask out of bounds (on a GPU, a device-side
        # assert that would end the engine)
        far_stop = replace(params, allowed_token_ids=(), min_tokens=2, stop_token_ids=(10**6,))
        far = run(collect(engine, GenerationRequest("d", PROMPTS["b2"], far_stop)))
        with pytest.raises(InvalidRequestError, match="allowed_token_ids must be in"):
            engine.generate(
                GenerationRequest("c", [5], replace(params, allowed_token_ids=(10**6,)))
            )
    finally:
        run(engine.shutdown(5))
    want = greedy_held(ref, PROMPTS["x1"], 6, set(), 0, only=only)
    assert list(held[-1].token_ids) == want and set(want) <= set(only)
    base = greedy_held(make_tiny_llama(), PROMPTS["b2"], 6, set(), 0)
    assert list(free[-1].token_ids) == base
    assert list(far[-1].token_ids) == base and far[-1].reason == "length"
