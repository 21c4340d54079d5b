"""Decoding one step ahead (`paged/ahead.py`) through engine v2's recorded decode graphs,
on the CPU (`RecordedCapture` re-runs the recorded Python, so the pipelined bookkeeping
runs in order): the greedy tokens equal independent references while rows finish at
different steps, arrive mid-decode, get cancelled, stop on a string, or need the host
(sampling, logprobs) so that the steps around them run as usual; the steps launched ahead
are adopted when the plan is theirs and dropped when it is not."""

from __future__ import annotations

import asyncio

import pytest
import torch
from test_engine import ADAPTER_OF, PROMPTS, collect, greedy, run
from test_engine_batch import greedy_alone
from test_paged_engine import make_engine
from tiny_engine import make_char_tokenizer, make_tiny_llama

from flora_server.engine.paged.ahead import Ahead, DeviceTokens, pipelines
from flora_server.engine.paged.capture import RecordedCapture
from flora_server.engine.paged.scheduler import ScheduledChunk, SequenceState
from flora_server.engine.protocol import FinishEvent, GenerationRequest, SamplingParams

pytestmark = pytest.mark.timeout(180)


def graphed(adapters, **kwargs):
    """Engine v2 with recorded decode graphs; no merges (a merge drops the step launched
    ahead: the merge test of test_paged_graphs.py covers that), so the counts are exact."""
    return make_engine(
        adapters, graph_capture=RecordedCapture(), **{"merge_after_steps": None, **kwargs}
    )


def stepper_of(engine):
    return engine._stepper  # type: ignore[attr-defined]


BUDGETS = {"x1": 3, "y1": 14, "b1": 9, "x2": 20, "b2": 6}


def no_fallbacks(caplog) -> None:
    """No pipelined step fell back to the usual path because something raised."""
    warned = [r for r in caplog.records if r.name.endswith("paged.stepper")]
    assert not warned, [r.getMessage() for r in warned]


def test_pipelined_greedy_tokens_match_references_as_rows_come_and_go(
    adapters, refs, caplog
) -> None:
    """Five rows with budgets 3-20 finish at different steps; a sixth arrives after the
    first tokens of the others (its prefill step drops the step launched ahead)."""
    engine = graphed(adapters)
    late = GenerationRequest("late", [7, 7, 31], greedy(8), "y")

    async def main():
        async def one(key):
            req = GenerationRequest(key, PROMPTS[key], greedy(BUDGETS[key]), ADAPTER_OF[key])
            return key, await collect(engine, req)

        async def arrive_late():
            await asyncio.sleep(0.05)
            return "late", await collect(engine, late)

        return dict(await asyncio.gather(*(one(k) for k in PROMPTS), arrive_late()))

    try:
        results = run(main())
        stepper = stepper_of(engine)
        launched, adopted = stepper.ahead_launched, stepper.ahead_adopted
    finally:
        run(engine.shutdown(5))
    for key, events in results.items():
        if key == "late":
            want = greedy_alone(refs["y"], late.prompt_ids, 8)
        else:
            want = greedy_alone(refs[ADAPTER_OF[key]], PROMPTS[key], BUDGETS[key])
        assert list(events[-1].token_ids) == want, key
        assert events[-1].reason == "length"
        assert [e.token_id for e in events[:-1]] == want  # each token emitted once, in order
    assert adopted > 10, (launched, adopted)
    assert launched > adopted  # steps launched ahead and dropped: finishes, the arrival
    no_fallbacks(caplog)


def test_a_cancelled_row_and_a_stop_string_leave_the_others_exact(adapters, refs, caplog) -> None:
    """A row cancelled mid-decode and a row that stops on a string (both found out by the
    host one step after the device went on) do not change the others' tokens."""
    engine = graphed(adapters)
    full = greedy_alone(refs[None], PROMPTS["b1"], 12)
    text = make_char_tokenizer().decode(full, skip_special_tokens=True)
    stop_text = text[5:7]

    async def main():
        stopping = GenerationRequest("b1", PROMPTS["b1"], greedy(12, stop=(stop_text,)), None)
        keep = GenerationRequest("y1", PROMPTS["y1"], greedy(16), "y")
        cancel = GenerationRequest("x1", PROMPTS["x1"], greedy(30), "x")

        async def cancelled():
            got = []
            async for event in engine.generate(cancel):
                got.append(event)
                if len(got) == 4:
                    break  # the client goes away: the stream is closed, the row cancelled
            return got

        return await asyncio.gather(collect(engine, stopping), collect(engine, keep), cancelled())

    try:
        stopped, kept, cancelled = run(main())
        adopted = stepper_of(engine).ahead_adopted
        stats = engine.stats()
    finally:
        run(engine.shutdown(5))
    assert stopped[-1].reason == "stop"
    assert stopped[-1].generated_text == text[: text.index(stop_text)]
    tokenizer = make_char_tokenizer()  # the tokens up to the one that completes the stop
    n = next(k for k in range(1, 13) if stop_text in tokenizer.decode(full[:k]))
    assert list(stopped[-1].token_ids) == full[:n] and n < 12
    assert list(kept[-1].token_ids) == greedy_alone(refs["y"], PROMPTS["y1"], 16)
    want = greedy_alone(refs["x"], PROMPTS["x1"], 4)
    assert [e.token_id for e in cancelled] == want
    assert adopted > 5 and stats.running == 0
    no_fallbacks(caplog)


def test_rows_that_need_the_host_run_their_steps_as_usual(adapters, refs) -> None:
    """A sampling row (seeded) and a row with logprobs make every step they are in run the
    usual way; the greedy rows beside them keep their reference tokens, and the seeded row
    its tokens from a run alone."""
    seeded = SamplingParams(max_new_tokens=10, do_sample=True, temperature=0.8, seed=123)

    def sampled_alone():
        engine = graphed(adapters)
        try:
            return run(collect(engine, GenerationRequest("s", PROMPTS["b2"], seeded, None)))
        finally:
            run(engine.shutdown(5))

    alone = sampled_alone()
    engine = graphed(adapters)

    async def main():
        return await asyncio.gather(
            collect(engine, GenerationRequest("s", PROMPTS["b2"], seeded, None)),
            collect(engine, GenerationRequest("x1", PROMPTS["x1"], greedy(14), "x")),
            collect(engine, GenerationRequest("lp", PROMPTS["y1"], greedy(6, logprobs=True), "y")),
        )

    try:
        sampled, plain, scored = run(main())
        adopted = stepper_of(engine).ahead_adopted
    finally:
        run(engine.shutdown(5))
    assert list(sampled[-1].token_ids) == list(alone[-1].token_ids)
    assert list(plain[-1].token_ids) == greedy_alone(refs["x"], PROMPTS["x1"], 14)
    assert list(scored[-1].token_ids) == greedy_alone(refs["y"], PROMPTS["y1"], 6)
    assert all(e.logprob is not None for e in scored[:-1])
    # the sampling row is in every step up to its 10th token: only the last 4 of x1 pipeline
    assert 0 < adopted <= 4


def test_the_eager_runner_never_pipelines(adapters, refs) -> None:
    engine = make_engine(adapters)
    try:
        events = run(collect(engine, GenerationRequest("x1", PROMPTS["x1"], greedy(8), "x")))
        stepper = stepper_of(engine)
    finally:
        run(engine.shutdown(5))
    assert list(events[-1].token_ids) == greedy_alone(refs["x"], PROMPTS["x1"], 8)
    assert stepper.ahead_launched == stepper.ahead_adopted == 0


# -- the pieces ------------------------------------------------------------------------------
def chunk(seq, start, count=1):
    return ScheduledChunk(seq, start, count)


def test_order_for_adopts_only_the_rows_and_positions_it_computed() -> None:
    a, b, c = (SequenceState(None, [1, 2, 3], None) for _ in range(3))  # type: ignore[arg-type]
    ahead = Ahead((a, b), (5, 9), DeviceTokens(torch.zeros(2, 4)), ("state",))
    assert ahead.order_for([chunk(a, 5), chunk(b, 9)], ("state",)) == [0, 1]
    assert ahead.order_for([chunk(b, 9)], ("state",)) == [1]  # a finished meanwhile
    assert ahead.order_for([chunk(b, 9), chunk(a, 5)], ("state",)) == [1, 0]
    assert ahead.order_for([chunk(a, 5), chunk(c, 2)], ("state",)) is None  # c is new
    assert ahead.order_for([chunk(a, 6)], ("state",)) is None  # another position
    assert ahead.order_for([chunk(a, 5, 2)], ("state",)) is None  # a chunk, not a token
    assert ahead.order_for([chunk(a, 5)], ("merged",)) is None  # the weights changed


def test_device_tokens_are_the_argmax_or_minus_one_where_not_finite() -> None:
    logits = torch.tensor(
        [[0.0, 3.0, 1.0], [float("nan"), 0.0, 1.0], [2.0, float("inf"), 0.0], [5.0, 4.0, 4.5]]
    )
    tokens = DeviceTokens(logits)
    assert tokens.host() == [1, -1, -1, 0]
    ids = tokens.device.tolist()  # what the next step reads: always a token id
    assert ids[0] == 1 and ids[3] == 0 and all(0 <= t < 3 for t in ids)


def test_pipelines_only_plain_greedy_rows() -> None:
    class Row:
        def __init__(self, constraint=None, generated=(), **params):
            self.request = GenerationRequest("r", [1], SamplingParams(**params))
            self.request.constraint = constraint
            self.generated = list(generated)

    assert pipelines(Row())
    assert pipelines(Row(stop=("x",), max_new_tokens=3, ignore_eos=True))
    assert not pipelines(Row(do_sample=True))
    assert not pipelines(Row(repetition_penalty=1.2))
    assert not pipelines(Row(logprobs=True))
    assert not pipelines(Row(top_logprobs=2))
    assert not pipelines(Row(constraint=object()))
    assert not pipelines(Row(min_tokens=2, generated=[5]))  # EOS held for the next token
    assert pipelines(Row(min_tokens=2, generated=[5, 6]))


def test_finish_event_counts_each_token_once(adapters, refs) -> None:
    """The last step launched ahead of a row that ends by its budget is never launched
    (the row is left out), so no step is dropped at the end of a lone request."""
    engine = graphed(adapters)
    try:
        events = run(collect(engine, GenerationRequest("b2", PROMPTS["b2"], greedy(10), None)))
        stepper = stepper_of(engine)
        launched, adopted = stepper.ahead_launched, stepper.ahead_adopted
    finally:
        run(engine.shutdown(5))
    assert isinstance(events[-1], FinishEvent) and events[-1].generated_tokens == 10
    assert list(events[-1].token_ids) == greedy_alone(refs[None], PROMPTS["b2"], 10)
    # token 1 from the prefill, 2 from a graph step, 3-10 from steps launched ahead
    assert (launched, adopted) == (8, 8)


def test_a_row_whose_logits_turn_non_finite_fails_alone(
    adapters, refs, monkeypatch, caplog
) -> None:
    """The device marks a row whose logits are not finite with -1 for the host (the fourth
    selection on the device here, forced for its first row): that request fails with the
    usual error; the other keeps its reference tokens; the step launched ahead meanwhile
    read a valid token id for the failed row (an id out of range would end the process on
    CUDA)."""
    import flora_server.engine.paged.stepper as stepper_module

    made = []

    class Poisoned(DeviceTokens):
        def __init__(self, logits: torch.Tensor) -> None:
            made.append(logits.shape[0])
            if len(made) == 4:
                logits = logits.clone()
                logits[0, 0] = float("nan")
            super().__init__(logits)

    monkeypatch.setattr(stepper_module, "DeviceTokens", Poisoned)
    engine = graphed(adapters)
    keys = ("b2", "y1")

    async def main():
        async def outcome(key):
            req = GenerationRequest(key, PROMPTS[key], greedy(12), ADAPTER_OF[key])
            try:
                return await collect(engine, req)
            except Exception as exc:
                return exc

        return await asyncio.gather(*(outcome(k) for k in keys))

    try:
        outcomes = dict(zip(keys, run(main()), strict=True))
        healthy = engine.healthy
    finally:
        run(engine.shutdown(5))
    assert made[3] == 2  # both rows were in the poisoned step
    failed = [k for k, o in outcomes.items() if isinstance(o, Exception)]
    assert len(failed) == 1 and "non-finite logits" in str(outcomes[failed[0]])
    (kept,) = set(keys) - set(failed)
    want = greedy_alone(refs[ADAPTER_OF[kept]], PROMPTS[kept], 12)
    assert list(outcomes[kept][-1].token_ids) == want
    assert healthy
    no_fallbacks(caplog)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA
def test_pipelined_tokens_equal_unpipelined_ones_with_cuda_graphs(adapters) -> None:
    """On CUDA the step launched ahead runs while the host emits the previous one (pinned
    copies, events, the graph reading its input tokens from the device): the same rows,
    admitted together, give the same tokens with and without it."""
    from tiny_engine import Held

    from flora_server.engine.paged.capture import CudaGraphCapture

    device = torch.device("cuda")

    def tokens(ahead: bool) -> tuple[dict[str, list[int]], int]:
        engine = make_engine(
            adapters,
            model=make_tiny_llama().to(device),
            graph_capture=CudaGraphCapture(device),
            merge_after_steps=None,
        )
        stepper_of(engine).decode_ahead = ahead

        async def main():
            async def one(key):
                req = GenerationRequest(key, PROMPTS[key], greedy(BUDGETS[key]), ADAPTER_OF[key])
                return key, list((await collect(engine, req))[-1].token_ids)

            with Held(engine):
                tasks = [asyncio.ensure_future(one(k)) for k in PROMPTS]
                await asyncio.sleep(0)
            return dict(await asyncio.gather(*tasks))

        try:
            return run(main()), stepper_of(engine).ahead_adopted
        finally:
            run(engine.shutdown(5))

    pipelined, adopted = tokens(True)
    plain, none = tokens(False)
    assert pipelined == plain
    assert {k: len(v) for k, v in pipelined.items()} == BUDGETS
    assert adopted > 10 and none == 0
