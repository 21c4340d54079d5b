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
from flora.adapter.io import adapter_from_model, encode_adapter
from flora.fingerprint import base_fingerprint
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
