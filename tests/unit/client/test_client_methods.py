"""Every `Client` method against the stub server (real HTTP on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import pytest
from flora_stub_server import BASE, StubState

from flora_client import Client, Conflict, NotFound, ValidationError
from flora_client.types import ChatMessage


def upload(client: Client, adapter_dir: Path, adapter_id: str = "my-adapter") -> None:
    client.adapters.upload(adapter_dir, adapter_id)


def test_generate_sends_parameters_and_parses_details(
    stub: StubState, stub_url: str, adapter_dir: Path
) -> None:
    with Client(stub_url) as client:
        upload(client, adapter_dir)
        result = client.generate(
            "one two three", adapter_id="my-adapter", max_new_tokens=3, seed=7, stop="x", top_p=None
        )
    assert result.generated_text == "[my-adapter] three two"
    assert result.details is not None
    assert result.details.finish_reason == "length"
    assert result.details.generated_tokens == 3
    assert result.details.prompt_tokens == 3
    assert result.details.seed == 7
    assert result.details.adapter_id == "my-adapter"
    # None values are left out; a lone stop string becomes a list.
    assert stub.last_json["parameters"] == {
        "max_new_tokens": 3,
        "seed": 7,
        "stop": ["x"],
        "adapter_id": "my-adapter",
    }


def test_generate_base_model_sends_no_adapter(stub: StubState, stub_url: str) -> None:
    with Client(stub_url) as client:
        result = client.generate("a b")
    assert result.generated_text == " b a"
    assert "adapter_id" not in stub.last_json["parameters"]


def test_generate_stream_reassembles_exact_tokens(stub: StubState, stub_url: str) -> None:
    with Client(stub_url) as client:
        events = list(client.generate_stream("alpha beta gamma delta", max_new_tokens=10))
    tokens = [e.token for e in events if e.token is not None and not e.token.special]
    assert [t.text for t in tokens] == [" delta", " gamma", " beta", " alpha"]
    assert [t.id for t in tokens] == [100, 101, 102, 103]
    assert [t.logprob for t in tokens] == [0.0, -0.5, -1.0, -1.5]
    # Intermediate events carry no text; the last one carries the whole text and details.
    assert all(e.generated_text is None for e in events[:-1])
    assert events[-1].token is not None and events[-1].token.special
    assert events[-1].generated_text == "".join(t.text for t in tokens)
    assert events[-1].details is not None and events[-1].details.finish_reason == "eos"


def test_generate_stream_unknown_adapter_raises_before_iteration(
    stub: StubState, stub_url: str
) -> None:
    with Client(stub_url) as client, pytest.raises(NotFound) as info:
        client.generate_stream("x", adapter_id="nope")
    assert info.value.error_type == "not_found_error"


def test_validation_error_names_the_field(stub: StubState, stub_url: str) -> None:
    with Client(stub_url) as client, pytest.raises(ValidationError) as info:
        client.generate("x", max_new_tokens=1000)
    assert info.value.status_code == 422
    assert info.value.field == "parameters.max_new_tokens"


def test_complete_uses_base_model_name_from_models(stub: StubState, stub_url: str) -> None:
    with Client(stub_url) as client:
        result = client.complete("x y", max_new_tokens=5)
        assert stub.last_json["model"] == BASE
        assert stub.last_json["max_tokens"] == 5 and "max_new_tokens" not in stub.last_json
        # The base name is looked up once, then cached.
        client.complete("z")
    assert result.text == " y x"
    assert result.usage is not None and result.usage.completion_tokens == 2
    assert stub.attempts["GET /v1/models"] == 1


def test_complete_stream(stub: StubState, stub_url: str, adapter_dir: Path) -> None:
    with Client(stub_url, base_model=BASE) as client:
        upload(client, adapter_dir, "ad")
        chunks = list(client.complete("p q", adapter_id="ad", stream=True))
    assert [c.text for c in chunks] == ["[ad]", " q", " p", ""]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert stub.last_json["model"] == "ad" and stub.last_json["stream"] is True
    assert stub.attempts["GET /v1/models"] == 0


def test_chat_sends_history_and_parses_reply(stub: StubState, stub_url: str) -> None:
    history = [
        ChatMessage(role="system", content="be brief"),
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how are you"},
    ]
    with Client(stub_url, base_model=BASE) as client:
        result = client.chat(history)
    assert result.content == " you are how (turn 2)"
    assert stub.last_json["messages"][0] == {"role": "system", "content": "be brief"}
    assert len(stub.last_json["messages"]) == 4


def test_chat_stream_reassembles(stub: StubState, stub_url: str) -> None:
    with Client(stub_url, base_model=BASE) as client:
        chunks = list(client.chat([{"role": "user", "content": "a b"}], stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.content for c in chunks) == " b a (turn 1)"


def test_embed_orders_vectors(stub: StubState, stub_url: str, adapter_dir: Path) -> None:
    with Client(stub_url, base_model=BASE) as client:
        upload(client, adapter_dir, "emb")
        base = client.embed(["banana", "kiwi"])
        adapted = client.embed("aa", adapter_id="emb")
    assert base.vectors == [[6.0, 3.0, 0.0], [4.0, 0.0, 0.0]]
    assert adapted.vectors == [[2.0, 2.0, 1.0]]
    assert stub.last_json["input"] == ["aa"]


def test_classify_images_multipart(stub: StubState, stub_url: str, tmp_path: Path) -> None:
    first = tmp_path / "cat.png"
    first.write_bytes(b"\x89PNG" + b"0" * 2)  # 6 bytes: label index 0
    with Client(stub_url) as client:
        result = client.classify([first, b"1234567"], top_k=2)  # 7 bytes: index 1
    assert [[x.label for x in r] for r in result.results] == [["cat", "dog"], ["dog", "cat"]]
    assert result.results[0][0].score == pytest.approx(0.9)
    assert result.results[0][1].score == pytest.approx(0.45)
    assert stub.last_form == {"adapter_id": None, "top_k": "2", "filenames": ["cat.png", "image1"]}


def test_classify_texts_json(stub: StubState, stub_url: str) -> None:
    with Client(stub_url) as client:
        result = client.classify(["abc", "abcd"], top_k=1)
    assert [[x.label for x in r] for r in result.results] == [["bird"], ["tree"]]
    assert stub.last_json == {"inputs": ["abc", "abcd"], "top_k": 1}


def test_classify_rejects_mixed_inputs(stub_url: str) -> None:
    with Client(stub_url) as client, pytest.raises(ValueError, match="not both"):
        client.classify(["text", b"bytes"])


def test_adapter_lifecycle(stub: StubState, stub_url: str, adapter_dir: Path) -> None:
    blob = (adapter_dir / "adapter_config.json").read_bytes() + (
        adapter_dir / "adapter.safetensors"
    ).read_bytes()
    seen: list[tuple[int, int]] = []
    with Client(stub_url) as client:
        created = client.adapters.upload(
            adapter_dir, "a1", progress=lambda s, t: seen.append((s, t))
        )
        again = client.adapters.upload(adapter_dir, "a1")
        client.adapters.upload(adapter_dir, "a2")
        page = client.adapters.list(limit=1, offset=1)
        info = client.adapters.get("a1")
        client.adapters.delete("a1")
        with pytest.raises(NotFound):
            client.adapters.get("a1")
        with pytest.raises(NotFound):
            client.adapters.delete("a1")
    assert (created.status, again.status) == ("created", "unchanged")
    assert created.changed and not again.changed
    assert created.sha256 == hashlib.sha256(blob).hexdigest()
    assert created.created == 1_700_000_000 and created.location == "stored"
    assert created.size_bytes == len(blob)
    assert stub.last_form["parts"] == ["config", "weights"]
    # The directory form's digest field covers the weights file (the server's definition).
    weights = (adapter_dir / "adapter.safetensors").read_bytes()
    assert stub.last_form["sha256"] == hashlib.sha256(weights).hexdigest()
    assert [a.id for a in page.data] == ["a2"] and page.total == 2
    assert info.model_extra is not None and info.model_extra["config"]["method"] == "flora"
    # Progress ends at the full size of both files.
    assert seen[-1] == (len(blob), len(blob))
    assert all(a <= b for (a, _), (b, _) in itertools.pairwise(seen))


def test_upload_archive_sends_digest_and_overwrite(
    stub: StubState, stub_url: str, tmp_path: Path
) -> None:
    archive = tmp_path / "x.flora"
    archive.write_bytes(b"single-file adapter v1")
    with Client(stub_url) as client:
        client.adapters.upload(archive, "arc")
        assert stub.last_form["sha256"] == hashlib.sha256(b"single-file adapter v1").hexdigest()
        assert stub.last_form["parts"] == ["archive"]
        archive.write_bytes(b"single-file adapter v2")
        with pytest.raises(Conflict):
            client.adapters.upload(archive, "arc")
        replaced = client.adapters.upload(archive, "arc", overwrite=True)
    assert stub.last_form["overwrite"] == "true"
    assert replaced.status == "replaced"
    assert replaced.sha256 == hashlib.sha256(b"single-file adapter v2").hexdigest()


def test_upload_rejects_incomplete_directory(tmp_path: Path, stub_url: str) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    missing = r"missing adapter\.safetensors"
    with Client(stub_url) as client, pytest.raises(FileNotFoundError, match=missing):
        client.adapters.upload(tmp_path, "x")


def test_probes_models_metrics(stub: StubState, stub_url: str) -> None:
    with Client(stub_url) as client:
        assert client.health() is True
        assert client.ready() is True
        stub.ready = False
        assert client.ready() is False
        stub.ready = True
        assert client.wait_ready(timeout=2) < 2
        assert client.metrics() == "flora_requests_total 7\n"
        assert [m.id for m in client.models().data] == [BASE]


def test_api_key_from_env_and_admin_key(
    stub: StubState, stub_url: str, monkeypatch: pytest.MonkeyPatch, adapter_dir: Path
) -> None:
    from flora_client import Forbidden, Unauthorized

    stub.api_key, stub.admin_key = "user-key", "admin-key"
    monkeypatch.setenv("FLORA_URL", stub_url)
    monkeypatch.setenv("FLORA_API_KEY", "user-key")
    with Client() as client:
        assert client.base_url == stub_url
        assert client.generate("a").generated_text == " a"
        with pytest.raises(Forbidden):
            client.adapters.list()
    with Client(api_key="admin-key") as admin:
        assert admin.adapters.list().total == 0
    with Client(api_key="wrong") as bad, pytest.raises(Unauthorized):
        bad.generate("a")


def test_adapters_iter_pages_with_after(stub: StubState, stub_url: str, adapter_dir: Path) -> None:
    for i in range(5):
        stub.adapters[f"ad{i}"] = {"id": f"ad{i}", "sha256": "x", "size_bytes": i}
    with Client(stub_url) as client:
        ids = [info.id for info in client.adapters.iter(page_size=2)]
        page = client.adapters.list(limit=2, after="ad1")
    assert ids == ["ad0", "ad1", "ad2", "ad3", "ad4"]
    assert stub.attempts["GET /v1/adapters"] == 4  # 3 pages + the explicit list
    assert [a.id for a in page.data] == ["ad2", "ad3"]
    assert page.has_more is True and page.next_after == "ad3"


def test_digest_mismatch_is_bad_request(
    stub: StubState, stub_url: str, adapter_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flora_client import BadRequest, _core

    # As if the file changed between hashing and sending.
    monkeypatch.setattr(_core, "sha256_file", lambda path: "0" * 64)
    with Client(stub_url) as client, pytest.raises(BadRequest, match="sha256"):
        client.adapters.upload(adapter_dir, "a")
    assert stub.adapters == {}
