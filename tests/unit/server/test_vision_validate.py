"""Upload validation of whole-saved modules: an adapter whose head (or other `full.*` module)
does not fit the base, or that the engine cannot serve, is refused at upload with a 422
naming the problem, not at first use with a 500."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file
from torch import nn
from vision_fixtures import make_base, make_loaded, png_bytes, random_image

import flora
from flora.adapter import read_embedded_config
from flora.adapter.io import adapter_from_model, encode_adapter
from flora.fingerprint import base_fingerprint
from flora.models import ModelError
from flora.serving import ServingModel
from flora_server.adapters.registry import AdapterValidationError
from flora_server.adapters.validator import BaseSnapshot, BaseValidator
from flora_server.engine.vision import VisionEngine
from flora_server.main import create_app
from flora_server.settings import Settings


def _loaded(tmp: Path):  # type: ignore[no-untyped-def]
    loaded = make_loaded()
    path = tmp / "base.safetensors"
    save_file({k: v.contiguous() for k, v in loaded.model.state_dict().items()}, str(path))
    loaded.source_path = path
    loaded.fingerprint = base_fingerprint(loaded.model)
    return loaded


def _adapter(
    *,
    head: nn.Module | None = None,
    train: list[str] | None = None,
    labels: int | None = None,
):  # type: ignore[no-untyped-def]
    """Conv adapter on stem+depthwise with random cores; `head` replaces the classifier;
    `train` names the modules saved whole."""
    torch.manual_seed(5)
    model = copy.deepcopy(make_base())
    if head is not None:
        model.classifier = head
    config = flora.FloraConfig(
        target_modules=["stem", "depthwise"], rank=2, train_modules=train or []
    )
    flora.inject(model, config)
    with torch.no_grad():
        for _, layer in flora.adapter_layers(model):
            layer.core.normal_(0.0, 0.2)
    names = [f"c{i}" for i in range(labels)] if labels else None
    return adapter_from_model(model, "tiny-cnn", task="image-classification", labels=names)


@pytest.fixture()
def validator(tmp_path: Path) -> BaseValidator:
    loaded = _loaded(tmp_path)
    base = BaseSnapshot.of(loaded)
    engine = VisionEngine(loaded, _NoSource(), max_slots=2)  # swaps the live head out
    return BaseValidator(base, engine.check_adapter)


class _NoSource:
    def load(self, adapter_id: str) -> object:
        raise KeyError(adapter_id)

    def exists(self, adapter_id: str) -> bool:
        return False


def _save(adapter: object, tmp: Path) -> Path:
    archive, _ = encode_adapter(adapter, archive=True)
    path = tmp / f"a{time.monotonic_ns()}.flora"
    path.write_bytes(archive)
    return path


def test_new_head_with_other_classes_is_accepted(validator: BaseValidator, tmp_path: Path) -> None:
    adapter = _adapter(head=nn.Linear(16, 3), train=["classifier"], labels=3)
    got = validator(_save(adapter, tmp_path))
    assert got.full_state("classifier")["weight"].shape == (3, 16)


def test_head_of_wrong_input_width_is_refused(validator: BaseValidator, tmp_path: Path) -> None:
    adapter = _adapter(head=nn.Linear(12, 3), train=["classifier"], labels=3)
    with pytest.raises(AdapterValidationError, match=r"full\.classifier\.weight.*\[3, 12\].*16"):
        validator(_save(adapter, tmp_path))


def test_head_bias_that_disagrees_with_weight_is_refused(
    validator: BaseValidator, tmp_path: Path
) -> None:
    adapter = _adapter(head=nn.Linear(16, 3), train=["classifier"], labels=3)
    adapter.tensors["full.classifier.bias"] = torch.zeros(4)
    with pytest.raises(AdapterValidationError, match=r"full\.classifier\.bias.*\[4\].*\[3\]"):
        validator(_save(adapter, tmp_path))


def test_whole_body_module_of_wrong_shape_is_refused(
    validator: BaseValidator, tmp_path: Path
) -> None:
    adapter = _adapter(train=["pointwise"])
    adapter.tensors["full.pointwise.weight"] = torch.zeros(16, 8, 3, 3)  # base: [16, 8, 1, 1]
    with pytest.raises(
        AdapterValidationError, match=r"full\.pointwise\.weight.*\[16, 8, 3, 3\].*\[16, 8, 1, 1\]"
    ):
        validator(_save(adapter, tmp_path))


def test_whole_body_module_the_engine_cannot_serve_is_refused(
    validator: BaseValidator, tmp_path: Path
) -> None:
    adapter = _adapter(train=["pointwise"])  # fits the base, but changes every row's body
    with pytest.raises(AdapterValidationError, match=r"retrains whole modules \['pointwise'\]"):
        validator(_save(adapter, tmp_path))


def test_llm_rule_refuses_any_whole_module(tmp_path: Path) -> None:
    loaded = _loaded(tmp_path)
    serving = ServingModel(loaded.model, max_slots=1)  # the LLM engine's runtime
    validator = BaseValidator(BaseSnapshot.of(loaded), serving.check)
    adapter = _adapter(head=nn.Linear(16, 3), train=["classifier"], labels=3)
    with pytest.raises(AdapterValidationError, match="replaces whole modules"):
        validator(_save(adapter, tmp_path))
    assert validator(_save(_adapter(), tmp_path)).full_modules() == []


@pytest.fixture()
def client(tmp_path: Path) -> Iterator[TestClient]:
    def factory(settings, registry, metrics):  # type: ignore[no-untyped-def]
        loaded = _loaded(tmp_path)
        base = BaseSnapshot.of(loaded)
        engine = VisionEngine(loaded, registry, max_slots=2, max_wait=0.0, metrics=metrics)
        return engine, BaseValidator(base, engine.check_adapter)

    app = create_app(Settings(home=tmp_path / "home"), engine_factory=factory)
    with TestClient(app) as c:
        for _ in range(500):
            if c.get("/ready").status_code == 200:
                break
            time.sleep(0.01)
        yield c


def test_upload_refuses_misfit_head_with_422_and_nothing_is_stored(client: TestClient) -> None:
    bad, _ = encode_adapter(
        _adapter(head=nn.Linear(12, 3), train=["classifier"], labels=3), archive=True
    )
    r = client.post("/v1/adapters", data={"adapter_id": "bad"}, files={"archive": ("a", bad)})
    assert r.status_code == 422, r.text
    assert "full.classifier.weight" in r.json()["error"]["message"]
    assert client.get("/v1/adapters/bad").status_code == 404
    good, _ = encode_adapter(
        _adapter(head=nn.Linear(16, 3), train=["classifier"], labels=3), archive=True
    )
    r = client.post("/v1/adapters", data={"adapter_id": "good"}, files={"archive": ("a", good)})
    assert r.status_code == 201, r.text
    image = random_image(1)
    r = client.post(
        "/v1/classify", data={"adapter_id": "good"}, files={"files": ("x.png", png_bytes(image))}
    )
    assert r.status_code == 200, r.text
    row = r.json()["results"][0]
    assert {p["label"] for p in row} == {"c0", "c1", "c2"}  # the adapter's own 3-class head
    assert sum(p["score"] for p in row) == pytest.approx(1.0, abs=1e-5)


# --- the base as uploads are judged must not change once the engine has served adapters ---
# A served adapter wraps base modules (`stem` -> `stem.base_layer`); the fingerprint of the
# base less an adapter's `train_modules` used to be computed from the live model's keys, so
# after any adapter was served a head adapter was a 500 at upload and, once stored, "another
# base's" adapter (hidden from the list, 404 to GET / DELETE / classify).


def test_fingerprint_less_trained_modules_is_the_same_after_wrapping(tmp_path: Path) -> None:
    loaded = _loaded(tmp_path)
    fresh = BaseValidator(BaseSnapshot.of(_loaded(tmp_path)), lambda adapter: None)
    base = BaseSnapshot.of(loaded)
    serving = ServingModel(loaded.model, max_slots=1)  # the LLM engine's runtime
    validator = BaseValidator(base, serving.check)
    serving.load(0, _adapter())  # wraps stem and depthwise
    assert "stem.base_layer.weight" in loaded.model.state_dict()
    want = fresh._fingerprint_for(["classifier"])
    assert validator._fingerprint_for(["classifier"]) == want != base.fingerprint
    head = _adapter(head=nn.Linear(16, 3), train=["classifier"], labels=3)
    assert head.fingerprint == want  # what training recorded
    header = read_embedded_config(_save(head, tmp_path))
    assert validator.foreign_base(header) is None
    # the LLM rule (no whole modules) answers as on a fresh server: 422, not a ModelError
    with pytest.raises(AdapterValidationError, match="replaces whole modules"):
        validator(_save(head, tmp_path))


def test_an_unreadable_base_is_an_error_not_another_base(tmp_path: Path) -> None:
    loaded = _loaded(tmp_path)
    validator = BaseValidator(BaseSnapshot.of(loaded), lambda adapter: None)
    head = _adapter(head=nn.Linear(16, 3), train=["classifier"], labels=3)
    header = read_embedded_config(_save(head, tmp_path))
    loaded.source_path.unlink()  # a server fault: the verdict must not be "foreign"
    with pytest.raises(ModelError, match="cannot read the base weights"):
        validator.foreign_base(header)
    # a train_modules FloraConfig would refuse is judged by the whole base's fingerprint
    mine = {**header, "config": {**header["config"], "train_modules": {"x": 1}}}
    mine["base_model"] = {**header["base_model"], "fingerprint": loaded.fingerprint}
    assert validator.foreign_base(mine) is None
    theirs = {**mine, "base_model": {"id": "other", "fingerprint": "sha256:other"}}
    assert validator.foreign_base(theirs) == "other"


def _vision_app(tmp_path: Path, store: Path) -> TestClient:
    def factory(settings, registry, metrics):  # type: ignore[no-untyped-def]
        loaded = _loaded(tmp_path)
        base = BaseSnapshot.of(loaded)
        engine = VisionEngine(loaded, registry, max_slots=2, max_wait=0.0, metrics=metrics)
        return engine, BaseValidator(base, engine.check_adapter)

    settings = Settings(home=tmp_path / "home", adapter_store=str(store))
    return TestClient(create_app(settings, engine_factory=factory))


def _ready(client: TestClient) -> TestClient:
    for _ in range(500):
        if client.get("/ready").status_code == 200:
            return client
        time.sleep(0.01)
    raise AssertionError(client.get("/ready").text)


def _upload(client: TestClient, adapter_id: str, adapter: object) -> int:
    archive = adapter if isinstance(adapter, bytes) else encode_adapter(adapter, archive=True)[0]
    files = {"archive": ("a", archive)}
    r = client.post("/v1/adapters", data={"adapter_id": adapter_id}, files=files)
    assert r.status_code in (200, 201), r.text
    return r.status_code


def _classify(client: TestClient, adapter_id: str) -> dict[str, float]:
    image = png_bytes(random_image(3))
    r = client.post(
        "/v1/classify", data={"adapter_id": adapter_id}, files={"files": ("x.png", image)}
    )
    assert r.status_code == 200, r.text
    return {p["label"]: p["score"] for p in r.json()["results"][0]}


def _head() -> object:
    return _adapter(head=nn.Linear(16, 3), train=["classifier"], labels=3)


@pytest.mark.parametrize("head_first", [True, False])
def test_head_adapter_upload_does_not_depend_on_what_was_served(
    tmp_path: Path, head_first: bool
) -> None:
    with _vision_app(tmp_path, tmp_path / "store") as client:
        _ready(client)
        order = [("head", _head()), ("plain", _adapter())]
        for adapter_id, adapter in order if head_first else order[::-1]:
            assert _upload(client, adapter_id, adapter) == 201
            _classify(client, adapter_id)  # serve it: the engine wraps its modules
        scores = _classify(client, "head")
        assert set(scores) == {"c0", "c1", "c2"}  # the adapter's own 3-class head
        assert sorted(a["id"] for a in client.get("/v1/adapters").json()["data"]) == [
            "head",
            "plain",
        ]
    # the same answer whatever the order (same base, same adapter, same image)
    other = tmp_path / "other"
    other.mkdir()
    with _vision_app(other, other / "store") as client:
        _ready(client)
        _upload(client, "head", _head())
        assert _classify(client, "head") == pytest.approx(scores, abs=1e-6)


def test_stored_head_adapter_stays_this_bases_after_a_restart(tmp_path: Path) -> None:
    store = tmp_path / "store"
    head, _ = encode_adapter(_head(), archive=True)  # one `created_at`: the same bytes
    with _vision_app(tmp_path, store) as client:
        _ready(client)
        _upload(client, "head", head)
        _upload(client, "plain", _adapter())
        want = _classify(client, "head")
    with _vision_app(tmp_path, store) as client:  # a restart on the same store
        _ready(client)
        _classify(client, "plain")  # another adapter served first: modules wrapped
        listed = sorted(a["id"] for a in client.get("/v1/adapters").json()["data"])
        assert listed == ["head", "plain"]
        r = client.get("/v1/adapters/head")
        assert r.status_code == 200, r.text
        assert _classify(client, "head") == pytest.approx(want, abs=1e-6)
        assert _upload(client, "head", head) == 200  # the same bytes: unchanged
        assert client.delete("/v1/adapters/head").status_code == 200
        assert client.get("/v1/adapters/head").status_code == 404
        assert [a["id"] for a in client.get("/v1/adapters").json()["data"]] == ["plain"]
        assert _upload(client, "head", head) == 201
