"""Logprobs the engine reports (prompt tokens, generated tokens, top-n alternatives) and
`ignore_eos`, on a tiny random Llama with a real flora adapter. The reference is one full
forward pass of the prompt and the generated tokens through a fresh model with the adapter
merged by flora itself. The tokens' own texts (`TokenEvent.token_text`, `Logprob.text`) are
checked against the tokenizer's own decodes, with text held back for stop sequences, EOS,
and characters split over tokens."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
import torch
from test_engine import PAGED_TINY, collect, make_engine, run
from tiny_engine import (
    DictSource,
    TinyLoaded,
    make_char_tokenizer,
    make_flora_adapter,
    make_tiny_llama,
    merged_reference_model,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from flora_server.engine.llm_engine import LLMEngine
from flora_server.engine.paged.engine import PagedLLMEngine
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


# With repetition_penalty 2 the tiny Llama's greedy text varies (a <pad> among it).
VARIED = SamplingParams(12, repetition_penalty=2.0, logprobs=True, top_logprobs=3)


def test_token_texts_are_their_own_while_text_is_held_back(engine_kind) -> None:
    """Each event's `token_text` is its token decoded by the tokenizer itself, and each
    alternative's too, whether the text released with it is held back for a possible stop
    sequence, released later, or cut by one."""
    tok = make_char_tokenizer()

    def own(token_id: int) -> str:
        return tok.decode([token_id], skip_special_tokens=True)

    engine = make_engine({}, kind=engine_kind)
    try:
        base = run(collect(engine, GenerationRequest("a", PROMPT, VARIED)))
        ids = list(base[-1].token_ids)
        text = base[-1].generated_text
        held = replace(VARIED, stop=(text[2:4] + "☃",))  # never completed: ASCII only
        hold = run(collect(engine, GenerationRequest("b", PROMPT, held)))
        cut = run(
            collect(engine, GenerationRequest("c", PROMPT, replace(VARIED, stop=(text[4:6],))))
        )
    finally:
        run(engine.shutdown(5))
    assert text == tok.decode(ids, skip_special_tokens=True) and len(set(text)) > 5
    for events in (base, hold, cut):
        assert [e.token_text for e in events[:-1]] == [own(t) for t in events[-1].token_ids]
        for e in events[:-1]:
            assert [a.text for a in e.top_logprobs] == [own(a.token_id) for a in e.top_logprobs]
        assert "".join(e.text for e in events[:-1]) == events[-1].generated_text
    # Tokens 2 and 3 could start the stop sequence: their text goes out with token 4.
    assert [e.text for e in hold[2:5]] == ["", "", text[2:5]]
    assert hold[-1].generated_text == text and hold[-1].token_ids == base[-1].token_ids
    # The stop sequence ends the text before it; the token completing it keeps its text.
    assert cut[-1].reason == "stop" and cut[-1].generated_text == text[:4]
    assert cut[-2].text == "" and cut[-2].token_text == text[5] and len(cut) == 7


def test_eos_has_no_text_and_flushes_to_the_tokens_before_it(engine_kind) -> None:
    """Text held back when EOS comes is released with the EOS event, but belongs to the
    token it is the text of: EOS's own text is "", so the texts of the non-special tokens
    concatenate to `generated_text` (what TGI's clients rebuild a stream from)."""
    engine = make_engine({}, kind=engine_kind)
    try:
        base = run(collect(engine, GenerationRequest("a", PROMPT, VARIED)))
        ids, text = list(base[-1].token_ids), base[-1].generated_text
        assert ids[4] not in ids[:4]
        engine._stepper.eos_ids = {ids[4]}  # the fifth greedy token is now EOS
        held = replace(VARIED, stop=(text[3] + "☃",))
        events = run(collect(engine, GenerationRequest("b", PROMPT, held)))
    finally:
        run(engine.shutdown(5))
    finish = events[-1]
    assert finish.reason == "eos" and finish.generated_text == text[:4]
    eos = events[4]
    assert eos.special and eos.token_id == ids[4] and eos.token_text == ""
    assert eos.text == text[3]  # released with EOS ...
    assert (events[3].text, events[3].token_text) == ("", text[3])  # ... the text of token 3
    assert "".join(e.token_text for e in events[:-1] if not e.special) == finish.generated_text


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: ids 0-2 are <pad>, <eos>, <bos>, id 3 + b is byte b
    (GPT-2's byte-to-character map), so a character may span several tokens."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = dict(zip(printable, map(chr, printable), strict=True))
    extra = (b for b in range(256) if b not in chars)
    chars.update({b: chr(256 + n) for n, b in enumerate(extra)})
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2} | {chars[b]: 3 + b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>"
    )


def own_text(decode, ids: list[int], i: int, last: bool) -> str:  # type: ignore[no-untyped-def]
    """Token i's own text by whole decodes (TGI's rule): what the longest ids[:m], m <= i + 1,
    decoding to whole characters adds to the same for i; with `last`, all that is left."""

    def complete(n: int) -> str:
        while n and not (last and n == len(ids)) and decode(ids[:n]).endswith("\ufffd"):
            n -= 1
        return decode(ids[:n])

    return complete(i + 1)[len(complete(i)) :]


def test_token_texts_in_context_with_a_byte_level_tokenizer(engine_kind) -> None:
    """Characters split over tokens: each generated token, each alternative and each prompt
    token has its own text in context (the bytes of a character go to the token completing
    it), and the prompt's texts concatenate to the prompt decoded whole."""
    tok = byte_tokenizer()

    def decode(ids: list[int]) -> str:
        return tok.decode(ids, skip_special_tokens=True)

    torch.manual_seed(0)
    loaded = TinyLoaded(model=make_tiny_llama(vocab_size=259), preprocessor=tok)
    if engine_kind == "v2":
        engine: LLMEngine = PagedLLMEngine(loaded, DictSource({}), **PAGED_TINY)
    else:
        engine = LLMEngine(loaded, DictSource({}))
    engine.start()
    prompt = tok.encode("Emoji 😀🎉 café", add_special_tokens=False)
    params = replace(VARIED, max_new_tokens=16, prompt_logprobs=True)
    try:
        while not engine.ready:
            time.sleep(0.01)
        events = run(collect(engine, GenerationRequest("b", prompt, params)))
    finally:
        run(engine.shutdown(5))
    *tokens, finish = events
    ids = list(finish.token_ids)
    assert "\ufffd" in "".join(decode([t]) for t in ids)  # characters split over tokens
    for k, event in enumerate(tokens):
        assert event.token_text == own_text(decode, ids, k, last=True)
        for alt in event.top_logprobs:
            assert alt.text == own_text(decode, [*ids[:k], alt.token_id], k, last=False)
    assert "".join(e.token_text for e in tokens) == decode(ids) == finish.generated_text
    entries = finish.prompt_logprobs
    assert [e.text for e in entries] == [
        own_text(decode, prompt, j, last=True) for j in range(len(prompt))
    ]
    assert "".join(e.text for e in entries) == "Emoji 😀🎉 café"
    for j, entry in enumerate(entries[1:], start=1):
        for alt in entry.top:
            assert alt.text == own_text(decode, [*prompt[:j], alt.token_id], j, last=False)
