"""BaseOwnership: the verdict on each stored adapter's base, read from its own header once
per content digest."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from api_fakes import make_archive, make_config, make_weights

from flora_server.adapters.ownership import HEADER_PROBE_BYTES, BaseOwnership
from flora_server.adapters.store import LocalAdapterStore, StoredAdapterMissingError


class Judge:
    """Names the base of any config whose fingerprint is not `mine`; records its calls."""

    def __init__(self, mine: str = "sha256:fake-base") -> None:
        self.mine = mine
        self.seen: list[dict[str, Any]] = []

    def __call__(self, config: dict[str, Any]) -> str | None:
        self.seen.append(config)
        base = config["base_model"]
        return None if base["fingerprint"] == self.mine else base["fingerprint"]


@pytest.fixture
def store(tmp_path):
    return LocalAdapterStore(tmp_path / "store")


def put(store: LocalAdapterStore, adapter_id: str, data: bytes) -> None:
    store.put(adapter_id, io.BytesIO(data))


def test_verdicts_come_from_the_header_once_per_digest(store) -> None:
    judge = Judge()
    ownership = BaseOwnership(store, judge)
    put(store, "mine", make_archive(b"\x00" * 16))
    put(store, "theirs", make_archive(b"\x00" * 16, fingerprint="sha256:other"))
    put(store, "copy", make_archive(b"\x00" * 16))  # the same bytes as "mine"
    assert ownership.foreign_base("mine") is None
    assert ownership.foreign_base("theirs") == "sha256:other"
    assert ownership.foreign_base("copy") is None
    assert ownership.foreign_base("mine") is None
    assert [c["base_model"]["fingerprint"] for c in judge.seen] == [
        "sha256:fake-base",
        "sha256:other",
    ]
    # New bytes under an id are a new question.
    put(store, "mine", make_archive(b"\x01" * 16, fingerprint="sha256:other"))
    assert ownership.foreign_base("mine") == "sha256:other" and len(judge.seen) == 3
    with pytest.raises(StoredAdapterMissingError):
        ownership.foreign_base("absent")


def test_a_header_longer_than_the_probe_is_read_whole(store) -> None:
    config = json.loads(make_config())
    config["metadata"] = {"note": "x" * (2 * HEADER_PROBE_BYTES)}
    put(store, "long", make_weights(metadata={"adapter_config": json.dumps(config)}))
    judge = Judge()
    assert BaseOwnership(store, judge).foreign_base("long") is None
    assert judge.seen == [config]


@pytest.mark.parametrize(
    "data",
    [
        b"not safetensors",
        make_weights(),  # no config in the header
        (2**40).to_bytes(8, "little") + b"{}",  # over the header cap
        make_weights(metadata={"adapter_config": '{"base_model": 1, "base_model": 2}'}),
        make_archive()[:40],  # truncated inside the header
    ],
)
def test_unreadable_headers_are_left_to_validation(store, data: bytes) -> None:
    judge = Judge()
    put(store, "bad", data)
    assert BaseOwnership(store, judge).foreign_base("bad") is None
    assert judge.seen == []


def test_the_cache_is_bounded(store) -> None:
    judge = Judge()
    ownership = BaseOwnership(store, judge, max_verdicts=2)
    for i in range(3):
        put(store, f"a{i}", make_archive(bytes([i]) * 16))
        ownership.foreign_base(f"a{i}")
    ownership.foreign_base("a0")  # forgotten when the third verdict cleared the cache
    ownership.foreign_base("a2")  # remembered since
    assert len(judge.seen) == 4
