"""Device slots are first come, first served (`LLMEngine._admit`): a request for an adapter
that finds every slot pinned by running requests gets the first slot freed, even while
later requests for the resident adapters keep arriving; base rows still join meanwhile.
Both engines, on the tiny Llama with real flora adapters (references: full forwards of a
fresh model with the adapter merged by flora)."""

from __future__ import annotations

import asyncio

import pytest
from test_engine import collect, greedy, make_engine, run
from test_engine_batch import greedy_alone
from tiny_engine import make_flora_adapter, make_tiny_llama, merged_reference_model

from flora_server.engine.protocol import GenerationRequest

pytestmark = pytest.mark.timeout(120)

PROMPT = [5, 17, 33, 60, 8]


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapters")
    return {name: make_flora_adapter(seed, tmp) for seed, name in enumerate("xyz", start=1)}


def test_a_request_waiting_for_a_slot_is_not_overtaken(three, engine_kind) -> None:
    engine = make_engine(three, kind=engine_kind, max_slots=2, merge_after_steps=None)
    admitted: dict[str, float] = {}

    async def one(name: str, adapter: str | None, steps: int):
        request = GenerationRequest(name, PROMPT, greedy(steps), adapter)
        events = await collect(engine, request)
        admitted[name] = request.admitted_at  # type: ignore[assignment]
        return events

    async def main():
        await one("warm-z", "z", 1)  # z on the host, so it waits for a slot, not a load
        first = [asyncio.ensure_future(one(n, n[0], 24)) for n in ("x-long", "y-long")]
        while engine.stats().running < 2:  # both slots pinned by running rows
            await asyncio.sleep(0.005)
        # z first, then requests for the resident x and y and a base request.
        later = [one("z", "z", 4), one("x-late", "x", 4), one("y-late", "y", 4)]
        later.append(one("base", None, 4))
        return await asyncio.gather(*first, *later)

    try:
        names = ["x-long", "y-long", "z", "x-late", "y-late", "base"]
        results = dict(zip(names, run(main()), strict=True))
    finally:
        run(engine.shutdown(5))
    # z got a slot before the later x and y requests pinned theirs again...
    assert admitted["z"] <= min(admitted["x-late"], admitted["y-late"])
    # ...while the base row, which needs no slot, was admitted at once, before z.
    assert admitted["base"] < admitted["z"]
    refs = {name: merged_reference_model(three[name]) for name in "xyz"}
    refs["b"] = make_tiny_llama()
    for name, events in results.items():
        steps = 24 if name.endswith("long") else 4
        assert list(events[-1].token_ids) == greedy_alone(refs[name[0]], PROMPT, steps), name
