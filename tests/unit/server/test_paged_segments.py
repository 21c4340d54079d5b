"""The routing of a packed step (`packed_segments`): a chunk is one segment."""

from __future__ import annotations

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
