"""Request lifecycle on both text engines (v1 and v2, the `engine_kind` fixture): stops,
limits, queue, cancellation, deadlines, adapter misses and failures, invalidation, seeded
sampling across batch compositions."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from test_engine import collect, greedy, make_engine, run
from test_engine_batch import greedy_alone
from tiny_engine import make_char_tokenizer, make_tiny_llama

from flora_server.engine.protocol import (
    AdapterNotFoundError,
    FinishEvent,
    GenerationRequest,
    InvalidRequestError,
    QueueFullError,
    SamplingParams,
)

pytestmark = pytest.mark.timeout(120)
PROMPT = [5, 17, 33, 60, 8]


class RecordingMetrics:
    """Records every hook call as (name, args)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, args))

    def finishes(self) -> list[tuple]:
        return [args for name, args in self.calls if name == "on_finish"]


@pytest.fixture
def engine(adapters, engine_kind):
    eng = make_engine(
        adapters, kind=engine_kind, max_queue=8, max_new_tokens_cap=20, metrics=RecordingMetrics()
    )
    yield eng
    run(eng.shutdown(5))


def test_stop_sequence_and_text_concatenation(engine) -> None:
    tok = make_char_tokenizer()
    full = greedy_alone(make_tiny_llama(), PROMPT, 12)
    text = tok.decode(full, skip_special_tokens=True)
    stop = text[5:7]
    events = run(collect(engine, GenerationRequest("s", PROMPT, greedy(12, stop=(stop,)))))
    final = events[-1]
    assert final.reason == "stop"
    assert final.generated_text == text[: text.index(stop)]
    assert "".join(e.text for e in events[:-1]) == final.generated_text
    assert final.generated_tokens == len(events) - 1 == text.index(stop) + len(stop)


def test_length_cap_and_eos(engine) -> None:
    events = run(collect(engine, GenerationRequest("l", PROMPT, greedy(100))))
    assert events[-1].reason == "length" and events[-1].generated_tokens == 20  # the cap
    tok = make_char_tokenizer()
    assert events[-1].generated_text == tok.decode(
        greedy_alone(make_tiny_llama(), PROMPT, 20), skip_special_tokens=True
    )
    # Make EOS the greedy choice at the 3rd token: the row ends there with reason "eos".
    third = greedy_alone(make_tiny_llama(), PROMPT, 3)[2]
    engine._stepper.eos_ids.add(third)
    events = run(collect(engine, GenerationRequest("e", PROMPT, greedy(10))))
    assert events[-1].reason == "eos" and events[-1].token_ids[-1] == third
    assert events[-1].generated_tokens == 3


def test_stop_token_ids_end_the_row_without_their_text(engine) -> None:
    """vLLM's stop_token_ids: the first generated token in the set ends the row (reason
    "stop", even with ignore_eos), counted in the tokens but its text left out of the
    output; its own text (for logprobs) is what it would have added."""
    tok = make_char_tokenizer()
    full = greedy_alone(make_tiny_llama(), PROMPT, 12)
    at = next(i for i in range(3, 12) if full[i] not in full[:i])  # its first occurrence
    for ignore_eos in (False, True):
        params = greedy(12, stop_token_ids=(full[at], 10**6), ignore_eos=ignore_eos)
        events = run(collect(engine, GenerationRequest("t", PROMPT, params)))
        final = events[-1]
        assert final.reason == "stop" and list(final.token_ids) == full[: at + 1]
        assert final.generated_text == tok.decode(full[:at], skip_special_tokens=True)
        assert "".join(e.text for e in events[:-1]) == final.generated_text
        assert events[-2].token_text == tok.decode(full[: at + 1])[len(final.generated_text) :]


def test_invalid_prompts_rejected(engine) -> None:
    async def submit(ids):
        return engine.generate(GenerationRequest("bad", ids, greedy(4)))

    for ids in ([], [1000], [3] * 256):
        with pytest.raises(InvalidRequestError):
            run(submit(ids))


def test_queue_full_raises_at_once(adapters, engine_kind) -> None:
    gate = threading.Event()
    eng = make_engine(adapters, gates={"x": gate}, max_queue=2, kind=engine_kind)
    try:

        async def flood():
            streams = [
                eng.generate(GenerationRequest(f"r{i}", PROMPT, greedy(3), "x")) for i in range(2)
            ]
            with pytest.raises(QueueFullError) as info:
                eng.generate(GenerationRequest("r3", PROMPT, greedy(3), "x"))
            assert info.value.retry_after > 0
            assert eng.stats().waiting == 2
            gate.set()
            return [[e async for e in s] for s in streams]

        results = run(flood())
        assert [r[-1].reason for r in results] == ["length", "length"]
    finally:
        gate.set()
        run(eng.shutdown(5))


def test_adapter_miss_delays_only_its_requests(adapters, engine_kind) -> None:
    gate = threading.Event()
    eng = make_engine(adapters, gates={"y": gate}, kind=engine_kind)
    try:

        async def scenario():
            slow = eng.generate(GenerationRequest("slow", PROMPT, greedy(4), "y"))
            fast = await collect(eng, GenerationRequest("fast", PROMPT, greedy(30), None))
            stats = eng.stats()
            gate.set()
            return fast, stats, [e async for e in slow]

        fast, stats, slow = run(scenario())
        assert fast[-1].generated_tokens == 30
        assert stats.waiting_adapters == ("y",) and stats.waiting == 1
        assert slow[-1].reason == "length"
    finally:
        gate.set()
        run(eng.shutdown(5))


def test_missing_adapter_fails_its_request(engine) -> None:
    with pytest.raises(AdapterNotFoundError):
        run(collect(engine, GenerationRequest("m", PROMPT, greedy(3), "nope")))
    events = run(collect(engine, GenerationRequest("ok", PROMPT, greedy(3), "x")))
    assert events[-1].generated_tokens == 3


def test_cancel_and_deadline(engine) -> None:
    async def cancel_after_two():
        stream = engine.generate(GenerationRequest("c", PROMPT, greedy(20), "x"))
        got = [await stream.__anext__(), await stream.__anext__()]
        await stream.aclose()
        return got

    assert len(run(cancel_after_two())) == 2
    deadline = time.monotonic() + 5
    while engine.stats().running:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # adapter, reason, prompt tokens, generated tokens (< 20: dropped early), seconds
    (finish,) = engine._metrics.finishes()
    assert finish[:3] == ("x", "cancelled", len(PROMPT)) and finish[3] < 20
    slot = engine.cache.current_slot("x")
    assert engine.cache._slots[slot].pins == 0  # the slot was released
    past = GenerationRequest("d", PROMPT, greedy(5), deadline=time.monotonic() - 1)
    events = run(collect(engine, past))
    assert events[-1].reason == "deadline" and events[-1].generated_tokens == 0


def test_invalidate_reloads(adapters, engine_kind) -> None:
    source_adapters = dict(adapters)
    eng = make_engine(source_adapters, kind=engine_kind)
    try:
        source = eng.cache._source
        first = run(collect(eng, GenerationRequest("a", PROMPT, greedy(5), "x")))
        source.adapters["x"] = adapters["y"]  # overwrite in the store
        eng.invalidate_adapter("x")
        second = run(collect(eng, GenerationRequest("b", PROMPT, greedy(5), "x")))
        y_run = run(collect(eng, GenerationRequest("c", PROMPT, greedy(5), "y")))
        assert source.loads.count("x") == 2
        assert first[-1].token_ids != second[-1].token_ids
        assert second[-1].token_ids == y_run[-1].token_ids
    finally:
        run(eng.shutdown(5))


def test_seeded_sampling_independent_of_batch(engine) -> None:
    params = SamplingParams(
        max_new_tokens=8,
        do_sample=True,
        temperature=1.3,
        top_p=0.95,
        top_k=40,
        repetition_penalty=1.2,
        seed=7,
    )

    async def together():
        others = [
            engine.generate(GenerationRequest(f"o{i}", [3 + i] * (i + 2), greedy(8), a))
            for i, a in enumerate(["y", None, "x"])
        ]
        mine = await collect(engine, GenerationRequest("me", PROMPT, params, "x"))
        for s in others:
            async for _ in s:
                pass
        return mine

    alone = run(collect(engine, GenerationRequest("me", PROMPT, params, "x")))
    assert run(together())[-1].token_ids == alone[-1].token_ids
    other_seed = SamplingParams(**{**params.__dict__, "seed": 8})
    diff = run(collect(engine, GenerationRequest("me", PROMPT, other_seed, "x")))
    assert diff[-1].token_ids != alone[-1].token_ids
    assert isinstance(alone[-1], FinishEvent)


def test_ready_healthy_and_shutdown(adapters, engine_kind) -> None:
    eng = make_engine(adapters, kind=engine_kind)
    assert eng.ready and eng.healthy and eng.stats().mode == "idle"
    run(eng.shutdown(5))
    assert not eng.ready and not eng._thread.is_alive()
    with pytest.raises(Exception, match="starting or shutting down"):
        run(_generate(eng))
    assert torch.is_tensor(torch.zeros(1))


async def _generate(eng):
    return eng.generate(GenerationRequest("late", PROMPT, greedy(2)))
