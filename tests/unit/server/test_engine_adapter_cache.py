"""AdapterCache: slots over a host LRU over the store, with a recording fake runtime."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from flora_server.engine.adapter_cache import AdapterCache, adapter_nbytes
from flora_server.engine.protocol import AdapterLoadError, AdapterNotFoundError


class FakeRuntime:
    def __init__(self, slots: int) -> None:
        self.slots: list[str | None] = [None] * slots
        self.merged_slot: int | None = None
        self.calls: list[tuple] = []
        self.refuse: set[str] = set()

    def check(self, adapter):
        if adapter.name in self.refuse:
            raise ValueError(f"{adapter.name}: not servable")

    def load(self, slot, adapter):
        self.calls.append(("load", slot, adapter.name))
        self.slots[slot] = adapter.name

    def unload(self, slot):
        self.calls.append(("unload", slot))
        self.slots[slot] = None

    def unmerge(self):
        self.calls.append(("unmerge",))
        self.merged_slot = None


class Source:
    def __init__(self, names, size=100, gate=None) -> None:
        self.names, self.size, self.gate, self.loads = set(names), size, gate, []

    def load(self, adapter_id):
        if self.gate is not None:
            self.gate.wait(5)
        self.loads.append(adapter_id)
        if adapter_id not in self.names:
            raise AdapterNotFoundError(adapter_id)
        if adapter_id == "broken":
            raise OSError("disk on fire")
        return SimpleNamespace(name=adapter_id, nbytes=self.size)

    def exists(self, adapter_id):
        return adapter_id in self.names


def place(cache, adapter_id):
    deadline = time.monotonic() + 5
    while (slot := cache.lookup(adapter_id)) is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return slot


def make(names, slots=2, host_bytes=1000, **kw):
    runtime = FakeRuntime(slots)
    source = Source(names, **kw)
    return AdapterCache(source, runtime, max_slots=slots, host_bytes=host_bytes), runtime, source


def test_nbytes() -> None:
    assert adapter_nbytes(SimpleNamespace(nbytes=7)) == 7
    tensors = {"a": torch.zeros(3, 4), "b": torch.zeros(2, dtype=torch.float16)}
    assert adapter_nbytes(SimpleNamespace(tensors=tensors)) == 48 + 4


def test_miss_then_hits_and_lru_eviction_among_unpinned() -> None:
    cache, runtime, source = make(["a", "b", "c"])
    assert cache.lookup("a") is None  # background load started
    sa = place(cache, "a")
    sb = place(cache, "b")
    assert {sa, sb} == {0, 1} and source.loads == ["a", "b"]
    cache.pin(sb)
    assert cache.lookup("a") == sa  # device hit, "a" now most recent but unpinned
    sc = place(cache, "c")  # evicts "a" (the only unpinned slot), never the pinned "b"
    assert sc == sa and runtime.slots[sa] == "c" and runtime.slots[sb] == "b"
    assert cache.counters.device_evictions == 1
    cache.unpin(sb)
    cache.lookup("b")  # touch b: a goes to the least recently used c's slot next
    assert place(cache, "a") == sc  # from the host cache: no store read
    assert source.loads == ["a", "b", "c"] and cache.counters.host_hits == 1
    cache.close()


def test_all_slots_pinned_waits() -> None:
    cache, runtime, _ = make(["a", "b"], slots=1)
    cache.pin(place(cache, "a"))
    deadline = time.monotonic() + 5
    while cache.lookup("b") is None and "b" not in cache._staged:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert cache.lookup("b") is None and runtime.slots == ["a"]
    cache.unpin(0)
    assert cache.lookup("b") == 0 and runtime.slots == ["b"]
    cache.close()


def test_host_lru_byte_budget() -> None:
    cache, _, source = make(["a", "b", "c"], slots=1, host_bytes=250, size=100)
    for name in "abc":
        place(cache, name)
    assert cache.host_adapters() == ("b", "c") and cache.host_bytes_used() == 200
    assert cache.counters.host_evictions == 1
    place(cache, "a")  # re-read from the store: it had left the host cache
    assert source.loads == ["a", "b", "c", "a"]
    cache.close()


def test_failures_are_reported_and_retried_after_ttl() -> None:
    cache, _, source = make(["broken"])
    cache._failure_ttl = 0.2
    for name, error in (("missing", AdapterNotFoundError), ("broken", AdapterLoadError)):
        assert cache.lookup(name) is None
        deadline = time.monotonic() + 5
        with pytest.raises(error):
            while time.monotonic() < deadline:
                cache.lookup(name)
                time.sleep(0.005)
    time.sleep(0.25)
    assert cache.lookup("missing") is None  # retried: a new store read started
    deadline = time.monotonic() + 5
    while source.loads.count("missing") < 2:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    cache.close()


def test_what_the_runtime_refuses_never_reaches_a_slot() -> None:
    cache, runtime, _ = make(["a", "bad"])
    runtime.refuse.add("bad")
    assert cache.lookup("bad") is None
    deadline = time.monotonic() + 5
    with pytest.raises(AdapterLoadError, match="bad: not servable"):
        while time.monotonic() < deadline:
            cache.lookup("bad")
            time.sleep(0.005)
    assert place(cache, "a") in (0, 1)
    assert [c for c in runtime.calls if c[0] == "load"] == [("load", 0, "a")]
    cache.close()


def test_invalidate_pinned_slot_unloads_when_released_and_reloads() -> None:
    cache, runtime, source = make(["a"])
    slot = place(cache, "a")
    cache.pin(slot)
    runtime.merged_slot = slot
    cache.invalidate("a")
    cache.apply_invalidations()
    assert runtime.slots[slot] == "a"  # a running request still uses it
    assert cache.device_adapters() == ()
    assert cache.lookup("a") is None  # new requests reload, they do not get the stale copy
    cache.unpin(slot)
    assert ("unmerge",) in runtime.calls and runtime.slots[slot] is None
    new_slot = place(cache, "a")
    assert source.loads == ["a", "a"] and runtime.slots[new_slot] == "a"
    cache.close()


def test_invalidate_discards_inflight_load() -> None:
    gate = threading.Event()
    cache, _, source = make(["a"], gate=gate)
    assert cache.lookup("a") is None
    cache.invalidate("a")
    gate.set()
    deadline = time.monotonic() + 5
    while not source.loads:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(0.05)
    assert cache._staged == {}  # the old generation's result was dropped
    assert place(cache, "a") is not None and source.loads == ["a", "a"]
    cache.close()
