"""Adapter config values that were accepted at upload and then served as garbage, and
config/weights pairs that did not belong together.

- `config.scale = 1e38` passed the fold-overflow check (the folded factors stay finite) but
  every embedding and score came back null: `ServingModel.check_output_range` refuses an
  update whose outputs overflow (422 naming the module);
- `metadata.pooling = {"mode": "bogus"}` (or a non-boolean `normalize`) was accepted and
  silently changed the scores: refused naming the field;
- `labels = ["pos", "pos"]` was accepted: refused naming the label;
- a config uploaded with another adapter's weights (same shapes) was accepted: the config's
  `tensors_sha256` must match (a config without it, as older versions wrote, still loads);
- a PEFT aLoRA adapter (`alora_invocation_tokens`) was converted to an always-on LoRA: 422.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from test_encoder_engine import TinyEncoderLoaded, make_bert
from tiny_engine import make_char_tokenizer

import flora
from flora.adapter.io import adapter_from_model, encode_adapter
from flora.errors import AdapterError
from flora.models.types import Pooling
from flora.serving import ServingModel
from flora.serving.factors import ModuleFactors
from flora.serving.gain import update_gain, update_gain_bound
from flora_server.adapters.registry import AdapterValidationError
from flora_server.engine.encoder import EncoderEngine, head_pooling
from flora_server.main import create_app
from flora_server.settings import Settings

HIDDEN = 32


def make_head_adapter(seed: int = 5, labels: tuple[str, ...] = ("neg", "pos")) -> flora.Adapter:
    """A text-classification adapter as flora-train saves one: FLoRA on every Linear of
    the encoder, a whole `classifier` head, the pooling in its metadata."""
    model = make_bert()
    torch.manual_seed(seed)
    model.add_module("classifier", torch.nn.Linear(HIDDEN, len(labels)))
    flora.inject(
        model,
        flora.FloraConfig(
            target_modules=["query", "key", "value", "dense"], rank=4, train_modules=["classifier"]
        ),
    )
    with torch.no_grad():
        for _, layer in flora.adapter_layers(model):
            layer.core.normal_(0.0, 0.05)
    return adapter_from_model(
        model,
        "tiny-bert",
        task="text-classification",
        labels=list(labels),
        pooling={"mode": "mean", "normalize": True},
    )


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    def factory(settings, registry, metrics):  # type: ignore[no-untyped-def]
        loaded = TinyEncoderLoaded(make_bert(), make_char_tokenizer())
        engine = EncoderEngine(loaded, registry, max_slots=2, max_wait=0.02)

        def validate(path):  # type: ignore[no-untyped-def]
            # the library's load, then the engine's upload check (what BaseValidator runs,
            # less the fingerprint, which a head adapter needs the base's weights file for)
            try:
                adapter = flora.load_adapter(path)
                engine.check_adapter(adapter)
            except (AdapterError, ValueError) as exc:
                raise AdapterValidationError(str(exc)) from exc
            return adapter

        return engine, validate

    app = create_app(Settings(home=tmp_path_factory.mktemp("h")), engine_factory=factory)
    with TestClient(app) as c:
        for _ in range(3000):  # up to 30 s on a loaded machine
            if c.get("/ready").status_code == 200:
                break
            time.sleep(0.01)
        yield c


def _upload_archive(client: TestClient, adapter_id: str, adapter: flora.Adapter) -> Any:
    archive, _ = encode_adapter(adapter, archive=True)
    return client.post(
        "/v1/adapters", data={"adapter_id": adapter_id}, files={"archive": ("a", archive)}
    )


def _with_config(adapter: flora.Adapter, **changes: Any) -> flora.Adapter:
    return dataclasses.replace(adapter, **changes)


def _refused(r: Any, fragment: str) -> None:
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_adapter" and fragment in error["message"], error


# -- scale ---------------------------------------------------------------------------------


def _scaled(adapter: flora.Adapter, scale: float) -> flora.Adapter:
    return _with_config(adapter, config=dataclasses.replace(adapter.config, scale=scale))


def _logits(adapter: flora.Adapter) -> torch.Tensor:
    """The adapter applied to a fresh base (as flora-train would): classifier logits."""
    model = make_bert()
    model.add_module("classifier", torch.nn.Linear(HIDDEN, 2))
    flora.apply_adapter(model, adapter, check_fingerprint=False)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        h = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        return model.classifier(torch.nn.functional.normalize(h.mean(1), dim=-1))


def test_scale_whose_outputs_overflow_is_422_and_a_sane_one_serves(client: TestClient) -> None:
    good = make_head_adapter()
    r = _upload_archive(client, "scaled-ok", good)
    assert r.status_code == 201, r.text
    ok = client.post("/v1/classify", json={"inputs": ["a b c"], "adapter_id": "scaled-ok"})
    assert ok.status_code == 200 and ok.json()["results"][0][0]["score"] is not None
    assert bool(torch.isfinite(_logits(good)).all())
    # Largest output per unit input, max over modules: 8.7 * scale. The logits turn NaN
    # between scale 1e10 (finite) and 1e12; the limit, 4.29e9, is below that.
    for scale in (1e30, 1e12):
        # finite as stored and once folded (the fold rule passes it), but its outputs are not
        assert not bool(torch.isfinite(_logits(_scaled(good, scale))).all())
        r = _upload_archive(client, "scaled", _scaled(good, scale))
        _refused(r, ": the update multiplies inputs of size 1 into outputs of ")
        message = r.json()["error"]["message"]
        assert f"(config.scale {scale:g}), past the 4.29e+09" in message, message
        assert message.endswith("its outputs would be Inf/NaN"), message
        assert client.get("/v1/adapters/scaled").status_code == 404


def test_update_gain_is_the_largest_output_for_unit_inputs() -> None:
    core = torch.tensor([[2.0, 0.0], [0.0, -1.0]])
    u_out = torch.tensor([[1.0, 0.0], [0.5, 1.0], [0.0, 0.0]])  # (out 3, r 2)
    u_in = torch.tensor([[1.0, 1.0], [-1.0, 0.0]])  # (in 2, r 2)
    mf = ModuleFactors("linear", core, (u_out, u_in), scale=3.0)
    dw = 3.0 * u_out @ core @ u_in.T  # [[6, -6], [0, -3], [0, 0]]
    assert torch.equal(dw, torch.tensor([[6.0, -6.0], [0.0, -3.0], [0.0, 0.0]]))
    assert update_gain(mf) == 12.0  # row 0: |6| + |-6|
    assert update_gain_bound(mf) == 12.0  # no cancellation here: the bound is exact
    conv1d = ModuleFactors("hf_conv1d", core, (u_in, u_out), scale=3.0)  # dW (in, out)
    assert update_gain(conv1d) == float((3.0 * u_in @ core @ u_out.T).abs().sum(0).max())
    emb = ModuleFactors("embedding", core, (u_out, u_in), scale=3.0)  # one id: one row
    assert update_gain(emb) == 6.0
    # every factor by its column maxima (|u_out|: [1, 1]; |u_in|: [1, 1]): 3 * sum |core|
    assert update_gain_bound(emb) == 9.0
    cancel = ModuleFactors("linear", torch.eye(2), (torch.ones(1, 2), torch.tensor([[1.0, -1.0]])))
    assert update_gain(cancel) == 0.0 and update_gain_bound(cancel) == 2.0


def test_check_output_range_limit_follows_the_serving_dtype() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 3))
    serving = ServingModel(model, max_slots=1)
    assert serving.gain_limit() == pytest.approx(4.295e9, rel=1e-3)  # float32 max ** (1/4)
    core = torch.tensor([[2.0, 0.0], [0.0, -1.0]])
    u_out = torch.tensor([[1.0, 0.0], [0.5, 1.0], [0.0, 0.0]])
    u_in = torch.tensor([[1.0, 1.0], [-1.0, 0.0]])
    limit = serving.gain_limit()
    fits = ModuleFactors(
        "linear", core, (u_out, u_in), scale=limit / 4.0 * 0.99
    )  # gain 4 per unit of scale
    serving.check_output_range({"0": fits})
    over = ModuleFactors("linear", core, (u_out, u_in), scale=limit / 4.0 * 1.01)
    with pytest.raises(ValueError, match=r"^0: the update multiplies inputs of size 1 into"):
        serving.check_output_range({"0": over})
    serving.check(_adapter_of(over))  # finite folds: the fold rule alone passes it
    half = ServingModel(torch.nn.Sequential(torch.nn.Linear(2, 3)).half(), max_slots=1)
    assert half.gain_limit() == 65504.0
    with pytest.raises(ValueError, match="float16 activations"):
        half.check_output_range({"0": ModuleFactors("linear", core, (u_out, u_in), 20000.0)})


def _adapter_of(mf: ModuleFactors) -> Any:
    """A stand-in adapter with one linear module "0" (what `ServingModel.check` reads)."""
    from types import SimpleNamespace

    spec = SimpleNamespace(kind="linear")
    return SimpleNamespace(
        full_modules=lambda: [],
        config=SimpleNamespace(scale=mf.scale),
        layer_names=lambda: ["0"],
        modules={"0": SimpleNamespace(spec=spec)},
        core=lambda name: mf.core,
        factors=lambda name: list(mf.factors),
    )


# -- pooling and labels ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pooling", "message"),
    [
        ({"mode": "bogus"}, "metadata.pooling.mode 'bogus' is not a pooling mode (mean, cls)"),
        ({"mode": 5}, "metadata.pooling.mode 5 is not a pooling mode (mean, cls)"),
        ({"mode": "mean", "normalize": "no"}, "metadata.pooling.normalize must be true or false"),
        ({"mode": "mean", "stride": 2}, "metadata.pooling has unknown fields ['stride']"),
        ("cls", "metadata.pooling must be an object, got str"),
    ],
)
def test_bad_pooling_is_422_naming_the_field(client: TestClient, pooling, message) -> None:
    adapter = make_head_adapter()
    bad = _with_config(adapter, metadata={**adapter.metadata, "pooling": pooling})
    r = _upload_archive(client, "bad-pooling", bad)
    _refused(r, message)
    assert client.get("/v1/adapters/bad-pooling").status_code == 404


def test_head_pooling_reads_the_allowed_values() -> None:
    base = Pooling("mean", True)
    assert head_pooling(base, {}) == base
    assert head_pooling(base, {"pooling": {"mode": "cls"}}) == Pooling("cls", True)
    assert head_pooling(base, {"pooling": {"normalize": False}}) == Pooling("mean", False)


def test_duplicate_labels_are_422_naming_the_label(client: TestClient) -> None:
    r = _upload_archive(client, "dup-labels", make_head_adapter(labels=("pos", "pos")))
    _refused(r, "labels: 'pos' names two of the head's classes")
    r = _upload_archive(client, "two-labels", make_head_adapter(labels=("neg", "pos")))
    assert r.status_code == 201, r.text


# -- config + weights pairs ------------------------------------------------------------------


def _pair(adapter: flora.Adapter) -> tuple[bytes, bytes]:
    weights, config = encode_adapter(adapter, archive=False)
    assert config is not None
    return config, weights


def _upload_pair(client: TestClient, adapter_id: str, config: bytes, weights: bytes) -> Any:
    files = {"config": ("adapter_config.json", config), "weights": ("w.safetensors", weights)}
    return client.post("/v1/adapters", data={"adapter_id": adapter_id}, files=files)


def test_upload_of_a_config_with_other_weights_is_422(client: TestClient) -> None:
    config_a, weights_a = _pair(make_head_adapter(seed=1))
    _, weights_b = _pair(make_head_adapter(seed=2))  # same shapes, other values
    r = _upload_pair(client, "mixed", config_a, weights_b)
    _refused(r, "adapter.safetensors does not belong to adapter_config.json")
    assert client.get("/v1/adapters/mixed").status_code == 404
    r = _upload_pair(client, "matched", config_a, weights_a)
    assert r.status_code == 201, r.text
    # A config without the field (older versions, hand-made ones) is taken as it is.
    legacy = json.loads(config_a)
    del legacy["tensors_sha256"]
    r = _upload_pair(client, "legacy", json.dumps(legacy).encode(), weights_b)
    assert r.status_code == 201, r.text


# -- PEFT aLoRA ------------------------------------------------------------------------------


def test_peft_alora_upload_is_422_naming_the_field(client: TestClient, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        copy.deepcopy(make_bert()),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]),
    )
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    weights = (tmp_path / "adapter_model.safetensors").read_bytes()
    assert not config.get("alora_invocation_tokens")
    r = _upload_pair(client, "plain-lora", json.dumps(config).encode(), weights)
    assert r.status_code == 201, r.text
    config["alora_invocation_tokens"] = [5, 6]
    r = _upload_pair(client, "alora", json.dumps(config).encode(), weights)
    _refused(r, "PEFT option alora_invocation_tokens=[5, 6] has no exact FLoRA equivalent")
    assert client.get("/v1/adapters/alora").status_code == 404
