"""LLMEngine end to end on a tiny random Llama with real flora adapters and flora.serving.

The references are independent of the engine: a fresh model run with full forward passes
(no KV cache, no padding), with the adapter applied by flora itself and merged."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from test_engine_batch import greedy_alone
from tiny_engine import (
    DictSource,
    TinyLoaded,
    make_char_tokenizer,
    make_tiny_llama,
    merged_reference_model,
)

from flora_server.engine.llm_engine import LLMEngine
from flora_server.engine.paged.engine import PagedLLMEngine
from flora_server.engine.protocol import (
    FinishEvent,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)

pytestmark = pytest.mark.timeout(120)


# Engine v2 on the tiny model: blocks of 4 and a step budget of 8 tokens, so prompts are
# chunked and sequences span several blocks.
PAGED_TINY = {"kv_block_size": 4, "max_num_batched_tokens": 8, "kv_cache_bytes": 1 << 20}


def make_engine(adapters, gates=None, kind: str = "v1", **kwargs) -> LLMEngine:
    """A started engine on the tiny Llama: v1 (`LLMEngine`) or v2 (`PagedLLMEngine`)."""
    torch.manual_seed(0)
    loaded = TinyLoaded(model=make_tiny_llama(), preprocessor=make_char_tokenizer())
    if kind == "v2":
        engine: LLMEngine = PagedLLMEngine(
            loaded, DictSource(adapters, gates), **{**PAGED_TINY, **kwargs}
        )
    else:
        engine = LLMEngine(loaded, DictSource(adapters, gates), **kwargs)
    engine.start()
    deadline = time.monotonic() + 30
    while not engine.ready:
        assert time.monotonic() < deadline, "engine did not become ready"
        time.sleep(0.01)
    return engine


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, **kw)


async def collect(engine, request):
    events = [e async for e in engine.generate(request)]
    assert isinstance(events[-1], FinishEvent)
    assert all(isinstance(e, TokenEvent) for e in events[:-1])
    return events


def run(coro):
    return asyncio.run(coro)


PROMPTS = {
    "x1": [5, 17, 33, 60, 8],
    "y1": [40, 41, 42],
    "b1": [9, 9, 70, 3, 3, 3, 12],
    "x2": [88],
    "b2": [20, 30],
}
ADAPTER_OF = {"x1": "x", "y1": "y", "b1": None, "x2": "x", "b2": None}


class ModeSwitches:
    """Engine metrics that record each merged-adapter switch as (old, new) in `switches`
    and ignore everything else."""

    def __init__(self, switches: list[tuple[str | None, str | None]]) -> None:
        self.switches = switches

    def on_mode_switch(self, old: str | None, new: str | None) -> None:
        self.switches.append((old, new))

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return lambda *a, **k: None


def test_mixed_batch_matches_solo_and_flora_merge(adapters, engine_kind) -> None:
    """Greedy tokens of X rows in a concurrent X/Y/base batch equal X alone in the engine
    and flora.merge(X) run directly; base rows equal the base model."""
    steps = 10
    engine = make_engine(adapters, kind=engine_kind, merge_after_steps=None)

    async def mixed():
        async def one(key, delay):
            await asyncio.sleep(delay)
            req = GenerationRequest(key, PROMPTS[key], greedy(steps), ADAPTER_OF[key])
            return key, await collect(engine, req)

        delays = {"x1": 0, "y1": 0, "b1": 0, "x2": 0.05, "b2": 0.1}
        return dict(await asyncio.gather(*(one(k, d) for k, d in delays.items())))

    try:
        results = run(mixed())
        solo = run(collect(engine, GenerationRequest("s", PROMPTS["x1"], greedy(steps), "x")))
    finally:
        run(engine.shutdown(5))
    refs = {
        "x": merged_reference_model(adapters["x"]),
        "y": merged_reference_model(adapters["y"]),
        None: make_tiny_llama(),
    }
    for key, events in results.items():
        expected = greedy_alone(refs[ADAPTER_OF[key]], PROMPTS[key], steps)
        assert list(events[-1].token_ids) == expected, key
    assert list(solo[-1].token_ids) == list(results["x1"][-1].token_ids)
    # The adapters matter: X's tokens differ from the base model's.
    assert list(results["x1"][-1].token_ids) != greedy_alone(refs[None], PROMPTS["x1"], steps)


def test_merged_mode_output_and_switches(adapters, engine_kind) -> None:
    """A homogeneous X batch goes merged after the hysteresis (its 48-token budget pays
    for the merge) and still equals the reference; a base request afterwards runs on
    bitwise-restored weights."""
    switches: list[tuple[str | None, str | None]] = []
    engine = make_engine(
        adapters, kind=engine_kind, merge_after_steps=2, metrics=ModeSwitches(switches)
    )
    base_state = {k: v.clone() for k, v in engine._model.state_dict().items()}
    try:
        x = run(collect(engine, GenerationRequest("a", PROMPTS["x1"], greedy(48), "x")))
        b = run(collect(engine, GenerationRequest("b", PROMPTS["b1"], greedy(6), None)))
    finally:
        run(engine.shutdown(5))
    assert switches == [(None, "x"), ("x", None)]
    ref = greedy_alone(merged_reference_model(adapters["x"]), PROMPTS["x1"], 48)
    assert list(x[-1].token_ids) == ref
    assert list(b[-1].token_ids) == greedy_alone(make_tiny_llama(), PROMPTS["b1"], 6)
    state = engine._model.state_dict()
    for name, value in base_state.items():
        key = name if name in state else name.replace(".weight", ".base_layer.weight")
        assert torch.equal(state[key], value), name


def test_an_overwrite_while_the_old_copy_runs_merged_serves_each_copy(
    adapters, engine_kind
) -> None:
    """X is overwritten (with Y's bytes) while a long X request runs merged: a new X
    request joins on the new copy, so the batch is no longer one adapter's and the engine
    unmerges; each request's tokens equal its own copy's reference (the old X, the new
    bytes), and neither fails."""
    switches: list[tuple[str | None, str | None]] = []
    source = dict(adapters)
    engine = make_engine(
        source, kind=engine_kind, merge_after_steps=2, metrics=ModeSwitches(switches)
    )
    long_n, short_n = 200, 8

    async def overwrite_while_merged():
        first_times, second_times = [], []

        async def timed(request, times):
            events = []
            async for event in engine.generate(request):
                times.append(time.monotonic())
                events.append(event)
            return events

        old = asyncio.create_task(
            timed(GenerationRequest("old", PROMPTS["x1"], greedy(long_n), "x"), first_times)
        )
        deadline = time.monotonic() + 30
        while engine._runtime.merged_slot is None:
            assert time.monotonic() < deadline and not old.done(), "never merged"
            await asyncio.sleep(0.001)
        engine.cache._source.adapters["x"] = adapters["y"]  # overwrite in the store
        engine.invalidate_adapter("x")
        new = await timed(
            GenerationRequest("new", PROMPTS["x2"], greedy(short_n), "x"), second_times
        )
        return await old, new, first_times, second_times

    try:
        old, new, old_times, new_times = run(overwrite_while_merged())
    finally:
        run(engine.shutdown(5))
    assert isinstance(new[-1], FinishEvent) and new[-1].reason == "length"
    assert new_times[-1] < old_times[-1], "the new request did not overlap the old one"
    assert list(old[-1].token_ids) == greedy_alone(
        merged_reference_model(adapters["x"]), PROMPTS["x1"], long_n
    )
    assert list(new[-1].token_ids) == greedy_alone(
        merged_reference_model(adapters["y"]), PROMPTS["x2"], short_n
    )
    assert switches[:2] == [(None, "x"), ("x", None)]  # merged, then unmerged for the new copy


def place(cache, adapter_id: str) -> int:
    """Look the adapter up until its background load lands on a slot."""
    deadline = time.monotonic() + 10
    while (slot := cache.lookup(adapter_id)) is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return slot


def test_thousand_merge_swaps_restore_base_bitwise(adapters) -> None:
    loaded = TinyLoaded(model=make_tiny_llama(), preprocessor=make_char_tokenizer())
    weights = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    engine = LLMEngine(loaded, DictSource(adapters))  # not started: this thread drives it
    runtime = engine._runtime
    slot_x, slot_y = place(engine.cache, "x"), place(engine.cache, "y")
    for i in range(1000):
        runtime.merge(slot_x if i % 2 == 0 else slot_y)
        if i % 3 == 0:
            runtime.unmerge()
    runtime.merge(slot_x)
    changed = [n for n, p in base_params(loaded.model).items() if not torch.equal(p, weights[n])]
    assert len(changed) == 2 * 4  # 4 target kinds x 2 layers carry a merged adapter now
    runtime.unmerge()
    restored = base_params(loaded.model)
    assert restored.keys() == weights.keys()
    for name, value in weights.items():
        assert torch.equal(restored[name], value), name
    engine.cache.close()


def base_params(model) -> dict[str, torch.Tensor]:
    """The base model's parameters under their original names (serving wraps modules)."""
    out = {}
    for name, param in model.named_parameters():
        out.setdefault(name.replace(".base_layer.", "."), param)
    return {n: p for n, p in out.items() if "bank" not in n and ".slots" not in n}


def test_bfloat16_adapter_banks_batched_equals_merged(adapters) -> None:
    """factor_dtype="bfloat16" (FLORA_FACTOR_DTYPE): the per-row banks hold bfloat16
    factors, and a row of X in a mixed batch gets the same greedy tokens as X alone once
    the engine has merged it (both read the same rounded factors)."""
    steps = 48  # a budget that pays for the solo request's merge
    engine = make_engine(adapters, factor_dtype="bfloat16", merge_after_steps=1)

    async def mixed():
        reqs = [GenerationRequest(k, PROMPTS[k], greedy(steps), ADAPTER_OF[k]) for k in PROMPTS]
        return await asyncio.gather(*(collect(engine, r) for r in reqs))

    try:
        results = dict(zip(PROMPTS, run(mixed()), strict=True))
        solo = run(collect(engine, GenerationRequest("s", PROMPTS["x1"], greedy(steps), "x")))
        banks = {w.bank.b.dtype for _, w in engine._runtime.named_wrappers()}
        merged = engine._runtime.merged_slot
    finally:
        run(engine.shutdown(5))
    assert banks == {torch.bfloat16}
    assert merged is not None  # the solo request ran merged
    assert list(solo[-1].token_ids) == list(results["x1"][-1].token_ids)
    # the adapter still matters after rounding: X's tokens are not the base model's
    assert list(results["x1"][-1].token_ids) != greedy_alone(
        make_tiny_llama(), PROMPTS["x1"], steps
    )
