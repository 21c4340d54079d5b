"""The routing of a packed step (`packed_segments`): a chunk is one segment."""

from __future__ import annotations

import asyncio

import pytest

from flora.serving import Segments
from flora_server.engine.paged.runner import ChunkInput, packed_segments


def chunk(n: int) -> ChunkInput:
    return ChunkInput(list(range(n)), 0, [0])


def test_a_prefill_chunk_is_one_segment_and_a_decode_token_one_of_one() -> None:
    chunks = [chunk(1), chunk(5), chunk(1), chunk(1)]
    slots = [2, *[0] * 5, None, 2]
    assert packed_segments(chunks, slots) == Segments((0, 1, 6, 7), (1, 5, 1, 1), (2, 0, -1, 2))


def test_a_chunk_with_two_slots_or_a_count_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="one chunk use slots"):
        packed_segments([chunk(2)], [0, 1])
    with pytest.raises(ValueError, match="3 token slots for 2 packed tokens"):
        packed_segments([chunk(2)], [0, 0, 0])


def test_long_chunks_of_different_adapters_in_one_step_match_references(
    monkeypatch, tmp_path
) -> None:
    """Prompts of 20-30 tokens for x, y and the base under a budget of 64: steps pack long
    chunks (the numba segment plan's GEMM path) of different adapters with decode tokens;
    every request's greedy tokens equal its adapter's model run alone."""
    from test_engine import collect, greedy, run
    from test_engine_batch import greedy_alone
    from test_paged_engine import make_engine
    from tiny_engine import make_flora_adapter, make_tiny_llama, merged_reference_model

    from flora_server.engine.paged import runner
    from flora_server.engine.protocol import GenerationRequest

    built: list[Segments] = []
    original = runner.packed_segments

    def spy(chunks, token_slots):  # type: ignore[no-untyped-def]
        segments = original(chunks, token_slots)
        built.append(segments)
        return segments

    monkeypatch.setattr(runner, "packed_segments", spy)
    adapters = {"x": make_flora_adapter(1, tmp_path), "y": make_flora_adapter(2, tmp_path)}
    refs = {
        "x": merged_reference_model(adapters["x"]),
        "y": merged_reference_model(adapters["y"]),
        None: make_tiny_llama(),
    }
    engine = make_engine(adapters, max_num_batched_tokens=64, kv_cache_bytes=1 << 21)
    prompts = {
        "x": [(7 * i) % 90 + 3 for i in range(30)],
        "y": [(5 * i) % 80 + 4 for i in range(24)],
        None: [(3 * i) % 70 + 5 for i in range(20)],
    }

    async def all_at_once():  # type: ignore[no-untyped-def]
        async def one(key):  # type: ignore[no-untyped-def]
            req = GenerationRequest(f"r-{key}", prompts[key], greedy(6), key)
            return key, await collect(engine, req)

        return dict(await asyncio.gather(*(one(k) for k in prompts)))

    try:
        results = run(all_at_once())
    finally:
        run(engine.shutdown(5))
    for key, events in results.items():
        assert list(events[-1].token_ids) == greedy_alone(refs[key], prompts[key], 6), key
    mixed_long = [
        s
        for s in built
        if len(set(s.slots)) > 1
        and any(n >= 16 and slot >= 0 for n, slot in zip(s.lengths, s.slots, strict=True))
    ]
    assert mixed_long, "no step packed a long adapted chunk with other slots"
