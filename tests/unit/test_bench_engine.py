"""bench.engine's arithmetic: the open-loop percentiles count a request that never got a
first token as infinitely late."""

from __future__ import annotations

from bench.engine import percentile


def test_percentile_is_nearest_rank_and_none_when_it_lands_on_a_missing_ttft() -> None:
    ttfts = [4.0, 1.0, None, 3.0, 2.0]
    assert percentile(ttfts, 0.5) == 3.0  # ranked 1, 2, 3, 4, inf: the 3rd of 5
    assert percentile(ttfts, 0.2) == 1.0
    assert percentile(ttfts, 0.8) == 4.0
    assert percentile(ttfts, 0.99) is None  # the request with no first token
    assert percentile([0.5], 0.99) == 0.5
