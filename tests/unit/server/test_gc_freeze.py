"""Start-up freezes the heap it built (`main.freeze_startup_heap`): a full collection then
walks only what came after, and a cyclic garbage made after start-up is still collected."""

from __future__ import annotations

import gc

import pytest

from flora_server.main import freeze_startup_heap


@pytest.fixture
def unfrozen():
    """Each test starts and ends with nothing frozen (the test process is shared)."""
    gc.unfreeze()
    yield
    gc.unfreeze()


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_freeze_takes_the_existing_heap_out_of_collections(unfrozen) -> None:
    kept = [Node() for _ in range(1000)]
    for i, node in enumerate(kept):
        node.other = kept[i - 1]  # one cycle through all of them, alive through `kept`
    tracked_before = len(gc.get_objects())
    freeze_startup_heap()
    assert gc.get_freeze_count() > 0.9 * tracked_before  # the live heap, minus its garbage
    walked = gc.get_objects()  # what a full collection would walk now
    assert len(walked) < 100
    assert not any(obj is kept[0] for obj in walked)
    # cyclic garbage made afterwards is collected as usual
    a, b = Node(), Node()
    a.other, b.other = b, a
    del a, b
    assert gc.collect() >= 2
    assert kept[0].other is kept[-1]  # the frozen cycle is intact


@pytest.mark.parametrize("freeze", [True, False])
def test_the_app_freezes_once_ready_when_set(tmp_path, unfrozen, freeze) -> None:
    from api_fakes import running_app

    with running_app(tmp_path, gc_freeze=freeze) as (client, _):
        assert client.get("/ready").status_code == 200
        frozen = gc.get_freeze_count()
    assert (frozen > 10_000) is freeze
