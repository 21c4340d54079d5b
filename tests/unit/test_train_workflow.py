"""flora-train workflow on tiny random bases: device and precision, gradient accumulation,
resume, checkpoints, best adapter, data formats, PEFT export, eval sampling, --help."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from train_tiny import tiny_effnet, tiny_encoder, tiny_llama

import flora
from flora.train import cli, train
from flora.train.checkpoint import SCALER_KEY
from flora.train.data import stratified_sample

TEXTS = [(f"good great fine film {i % 3}", "pos") for i in range(12)] + [
    (f"bad awful poor movie {i % 3}", "neg") for i in range(12)
]
CHATS = [
    {"prompt": f"hi {a}", "completion": f"ok {b}"}
    for a, b in [("1", "2"), ("3", "4"), ("5", "6"), ("7", "8"), ("9", "0"), ("2", "1")] * 2
]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _csv(tmp_path) -> str:
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "\n".join(f"{t},{y}" for t, y in TEXTS) + "\n")
    return str(path)


def _train_text(tmp_path, data: str, name: str = "out", dropout: bool = True, **kw):
    loaded = tiny_encoder()
    if not dropout:  # micro-batches draw other dropout masks than one batch would
        for m in loaded.model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    opts = {"max_steps": 4, "lr": 4e-3, "batch_size": 8, "eval_split": "0.25", "threads": 1}
    opts.update({"progress": False, **kw})
    metrics = train(
        "text-classification",
        base="tiny",
        data=data,
        out=tmp_path / name,
        loaded=loaded,
        **opts,
    )
    return metrics, loaded


def test_bf16_on_cpu_saves_a_float32_adapter_the_server_accepts(tmp_path):
    from flora.serving import ServingModel
    from flora_server.adapters.validator import BaseSnapshot, BaseValidator

    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(c) for c in CHATS) + "\n")
    loaded = tiny_llama()
    metrics = train(
        "causal-lm",
        base="tiny-llama",
        data=str(tmp_path / "c.jsonl"),
        out=tmp_path / "out",
        loaded=loaded,
        max_steps=3,
        batch_size=4,
        lr=1e-2,
        eval_split="0.25",
        device="cpu",
        precision="bf16",
        progress=False,
        threads=1,
    )
    assert metrics["device"] == "cpu" and metrics["precision"] == "bf16"
    fresh = tiny_llama()
    # The LLM server's validator: the base checks, then its engine's servability rule.
    serving = ServingModel(tiny_llama().model, max_slots=1)
    validate = BaseValidator(BaseSnapshot.of(fresh), serving.check)
    adapter = validate(tmp_path / "out")
    assert {t.dtype for t in adapter.tensors.values()} == {torch.float32}
    assert any(float(adapter.core(n).abs().sum()) > 0 for n in adapter.layer_names())
    # Applied to a fresh fp32 base, the adapter computes what the trained model computes.
    flora.apply_adapter(fresh.model, adapter)
    ids = torch.tensor([[4, 5, 6, 7, 8]])
    loaded.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            fresh.model(ids).logits, loaded.model(ids).logits, rtol=0, atol=0
        )


def test_bf16_image_classification_trains_every_conv_path(tmp_path):
    # tiny EfficientNet: a 3x3 stem (folded, two kernel factors), depthwise (direct) and
    # 1x1 convs under CPU bf16 autocast; the adapter stays float32
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (12, 12), (200 * (cls == "a"), 40 * i, 90)).save(
                tmp_path / "imgs" / cls / f"{i}.png"
            )
    loaded = tiny_effnet()
    paths = set()
    metrics = train(
        "image-classification",
        base="tiny",
        data=str(tmp_path / "imgs"),
        out=tmp_path / "out",
        loaded=loaded,
        max_steps=2,
        batch_size=4,
        eval_split="0.25",
        image_size=32,
        precision="bf16",
        device="cpu",
        progress=False,
        threads=1,
    )
    for _, layer in flora.adapter_layers(loaded.model):
        paths.add(getattr(layer, "path", None))
    assert {"folded", "direct"} <= paths
    assert metrics["precision"] == "bf16" and metrics["final_loss"] is not None
    adapter = flora.load_adapter(tmp_path / "out")
    assert {t.dtype for t in adapter.tensors.values()} == {torch.float32}


def test_grad_accum_equals_one_big_batch(tmp_path):
    data = _csv(tmp_path)
    _, one = _train_text(tmp_path, data, "a", False, batch_size=8, max_steps=3)
    _, acc = _train_text(tmp_path, data, "b", False, batch_size=4, grad_accum=2, max_steps=3)
    _, clipped = _train_text(tmp_path, data, "c", False, max_steps=3, max_grad_norm=1e-4)
    a, b, c = _state(one.model), _state(acc.model), _state(clipped.model)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
    # Each step's clip factor differs, which AdamW's per-step normalisation does not undo
    # after the first step: a clipped run ends elsewhere.
    assert any(not torch.allclose(c[n], a[n], atol=1e-6) for n in a)


def test_resume_latest_gives_the_uninterrupted_weights(tmp_path):
    import shutil

    data = _csv(tmp_path)
    _, whole = _train_text(tmp_path, data, "whole", max_steps=6)
    _train_text(tmp_path, data, "cut", max_steps=6, save_every=3)
    # Pretend the run died after step 3: drop what came later, resume from "latest".
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-000006")
    metrics, resumed = _train_text(tmp_path, data, "cut", max_steps=6, resume="latest")
    assert metrics["steps"] == 6
    # fp32 checkpoints carry no gradient-scaler state.
    state = json.loads((tmp_path / "cut/checkpoints/step-000003/trainer_state.json").read_text())
    assert SCALER_KEY not in state
    want, got = _state(whole.model), _state(resumed.model)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


INIT_SCALE = 2.0**20


class _TracedScaler(torch.amp.GradScaler):
    """A GradScaler that records the scale each optimizer step runs with. It starts above
    what the tiny model's fp16 gradients fit, so the run skips a step and backs off early,
    as a real fp16 run does in its first steps (the default 2**16 never overflows here)."""

    def __init__(self, device: str, enabled: bool) -> None:
        super().__init__(device, init_scale=INIT_SCALE, enabled=enabled)
        self.used: list[float] = []

    def step(self, optimizer, *args, **kwargs):
        self.used.append(self.get_scale())
        return super().step(optimizer, *args, **kwargs)


def test_fp16_resume_latest_restores_the_gradient_scaler(tmp_path, monkeypatch, capsys):
    import shutil

    from flora.train.device import Precision

    made: list[_TracedScaler] = []

    def traced(self):
        made.append(_TracedScaler(self.device.type, enabled=self.name == "fp16"))
        return made[-1]

    monkeypatch.setattr(Precision, "scaler", traced)
    data = _csv(tmp_path)
    fp16 = {"max_steps": 6, "precision": "fp16", "device": "cpu"}
    _, whole = _train_text(tmp_path, data, "whole", **fp16)
    used = made[-1].used
    # The scale backed off before the cut, so a fresh scaler after it would differ.
    assert len(used) == 6 and used[3] < INIT_SCALE
    _train_text(tmp_path, data, "cut", save_every=3, **fp16)
    state = json.loads((tmp_path / "cut/checkpoints/step-000003/trainer_state.json").read_text())
    assert state[SCALER_KEY]["scale"] == used[3]
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-000006")
    _, resumed = _train_text(tmp_path, data, "cut", resume="latest", **fp16)
    assert made[-1].used == used[3:]
    want, got = _state(whole.model), _state(resumed.model)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)

    # A checkpoint without scaler state (an older one) still resumes, with a fresh scaler
    # and a note.
    del state[SCALER_KEY]
    (tmp_path / "cut/checkpoints/step-000003/trainer_state.json").write_text(json.dumps(state))
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-000006")
    capsys.readouterr()
    _train_text(tmp_path, data, "cut", resume="latest", progress=True, **fp16)
    assert "fresh scaler" in capsys.readouterr().err
    assert made[-1].used[0] == INIT_SCALE


def test_restore_scaler_rejects_malformed_state_and_ignores_it_when_disabled():
    from flora.train.checkpoint import restore_scaler
    from flora.train.errors import TrainError

    good = torch.amp.GradScaler("cpu", init_scale=8.0).state_dict()
    for bad in [
        {**good, "scale": float("nan")},
        {**good, "scale": "8"},
        {**good, "_growth_tracker": 1.5},
        {**good, "growth_interval": 0},
        {k: v for k, v in good.items() if k != "backoff_factor"},
        [8.0],
    ]:
        with pytest.raises(TrainError, match=r"grad_scaler .* is malformed"):
            restore_scaler(torch.amp.GradScaler("cpu"), {SCALER_KEY: bad})
    scaler = torch.amp.GradScaler("cpu")
    assert restore_scaler(scaler, {SCALER_KEY: {**good, "_growth_tracker": 3}})
    assert scaler.get_scale() == 8.0 and scaler.state_dict()["_growth_tracker"] == 3
    assert not restore_scaler(torch.amp.GradScaler("cpu"), {"step": 3})
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    assert restore_scaler(disabled, {SCALER_KEY: good}) and not disabled.is_enabled()


def test_keep_checkpoints_prunes_the_oldest(tmp_path):
    _train_text(tmp_path, _csv(tmp_path), max_steps=6, save_every=2, keep_checkpoints=2)
    names = sorted(d.name for d in (tmp_path / "out" / "checkpoints").iterdir())
    assert names == ["step-000004", "step-000006"]


def test_eval_every_keeps_the_best_adapter(tmp_path):
    metrics, _ = _train_text(tmp_path, _csv(tmp_path), max_steps=4, eval_every=2)
    best = metrics["best"]
    assert best["metric"] == "eval_accuracy" and best["step"] in (2, 4)
    assert (tmp_path / "out" / "best" / "adapter_config.json").is_file()
    assert best["value"] >= metrics["eval_accuracy"]


def test_json_array_jsonl_and_datasets_inputs_train(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"sentence": t, "topic": y} for t, y in TEXTS]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "l.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[2:-2]),
            "test": datasets.Dataset.from_list(rows[:2] + rows[-2:]),
        }
    )
    ds.save_to_disk(str(tmp_path / "hf"))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    columns = {"text": "sentence", "label": "topic"}
    for name in ("a.json", "l.jsonl", "p.parquet"):
        metrics, _ = _train_text(tmp_path, str(tmp_path / name), "o-" + name, columns=columns)
        assert metrics["train_examples"] == 18 and metrics["eval_examples"] == 6, name
        assert metrics["labels"] == ["neg", "pos"]
    # The DatasetDict's own test split is the eval set.
    metrics, _ = _train_text(tmp_path, str(tmp_path / "hf"), "hf", columns=columns, eval_split=None)
    assert metrics["train_examples"] == 20 and metrics["eval_examples"] == 4
    assert metrics["final_loss"] is not None


def test_export_peft_matches_flora_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(c) for c in CHATS) + "\n")
    loaded = tiny_llama()
    train(
        "causal-lm",
        base="tiny-llama",
        data=str(tmp_path / "c.jsonl"),
        out=tmp_path / "out",
        loaded=loaded,
        max_steps=3,
        batch_size=4,
        lr=1e-2,
        export="peft",
        progress=False,
        threads=1,
    )
    assert (tmp_path / "out" / "peft" / "adapter_config.json").is_file()
    model = peft.PeftModel.from_pretrained(tiny_llama().model, str(tmp_path / "out" / "peft"))
    ids = torch.tensor([[4, 5, 6, 7, 8, 9]])
    model.eval()
    loaded.model.eval()
    with torch.no_grad():
        want = loaded.model(ids).logits
        got = model(ids).logits
    assert not torch.allclose(want, tiny_llama().model(ids).logits, atol=1e-4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_stratified_sample_keeps_the_class_mix():
    items = [(i, "a") for i in range(60)] + [(i, "b") for i in range(30)] + [(0, "c")] * 10
    sample = stratified_sample(items, 20, lambda x: x[1], seed=3)
    counts = {c: sum(1 for _, y in sample if y == c) for c in "abc"}
    assert counts == {"a": 12, "b": 6, "c": 2}
    assert stratified_sample(items, 20, lambda x: x[1], seed=3) == sample
    assert stratified_sample(items, 20, lambda x: x[1], seed=4) != sample
    assert stratified_sample(items, 0, None, seed=0) == items


def test_eval_metrics_share_one_sampled_set(tmp_path):
    metrics, _ = _train_text(tmp_path, _csv(tmp_path), eval_limit=4)
    assert metrics["eval_examples"] == 4 and metrics["eval_pool"] == 6
    assert metrics["eval_sampling"] == "stratified random, seed 0"
    # accuracies on 4 examples are multiples of 1/4: the probe saw the same 4
    for key in ("eval_accuracy", "base_eval_accuracy", "linear_probe_eval_accuracy"):
        assert (metrics[key] * 4) == pytest.approx(round(metrics[key] * 4)), key


def test_help_shows_defaults_and_push_needs_an_id(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "(default: fp32)" in out and "(default: auto)" in out and "(default: 1)" in out
    with pytest.raises(SystemExit) as exc:
        cli.main(["causal-lm", "--base", "b", "--data", "d", "--out", "o", "--push", "http://x"])
    assert exc.value.code == 2
    assert "--push needs --adapter-id" in capsys.readouterr().err


def test_bad_device_is_one_line(tmp_path, capsys, monkeypatch):
    from flora.train import api

    monkeypatch.setattr(api, "_load_base", lambda name: tiny_encoder())
    argv = ["text-classification", "--base", "x", "--data", _csv(tmp_path), "--out", "o"]
    code = cli.main([*argv, "--device", "tpu", "--quiet"])
    assert code == 2
    assert "--device: unknown device 'tpu'" in capsys.readouterr().err
