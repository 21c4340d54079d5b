"""A few-step run per recipe on tiny random bases: the loss falls, and the saved adapter,
applied to a fresh base, reproduces the trained model's outputs exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from train_tiny import tiny_effnet, tiny_encoder, tiny_llama

import flora
from flora.train import train
from flora.train.text_classification import attach_text_head, sentence_logits


def _falls(losses: list[float]) -> bool:
    return sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def _losses(out) -> list[float]:
    final = sorted((out / "checkpoints").iterdir())[-1]
    return json.loads((final / "trainer_state.json").read_text())["losses"]


def test_text_classification_learns_and_reloads_exactly(tmp_path):
    rows = ["text,label"]
    rows += [f"good great fine film {i % 3},pos" for i in range(12)]
    rows += [f"bad awful poor movie {i % 3},neg" for i in range(12)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    loaded = tiny_encoder()
    metrics = train(
        "text-classification",
        base="tiny",
        data=str(tmp_path / "d.csv"),
        out=tmp_path / "out",
        loaded=loaded,
        max_steps=12,
        lr=4e-3,
        batch_size=8,
        eval_split="0.25",
        progress=False,
        threads=1,
    )
    assert metrics["labels"] == ["neg", "pos"]
    assert metrics["eval_accuracy"] == 1.0
    assert _falls(_losses(tmp_path / "out"))
    # Head (32 x 2 + 2) plus 6 Linear layers per block with rank 8 adapters.
    assert metrics["trainable_params"] == sum(
        p.numel() for p in loaded.model.parameters() if p.requires_grad
    )

    fresh = tiny_encoder()
    attach_text_head(fresh.model, 2)
    adapter = flora.load_adapter(tmp_path / "out")
    assert adapter.task == "text-classification" and adapter.labels == ["neg", "pos"]
    flora.apply_adapter(fresh.model, adapter)
    enc = loaded.preprocessor(["good film", "awful movie 3"], padding=True, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    loaded.model.eval()
    fresh.model.eval()
    with torch.no_grad():
        want = sentence_logits(loaded.model, batch, loaded.pooling)
        got = sentence_logits(fresh.model, batch, fresh.pooling)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _write_images(root, n_per_class=6):
    rng = np.random.default_rng(0)
    colours = {"red": (200, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 200)}
    for name, rgb in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            px = np.clip(np.array(rgb) + rng.normal(0, 25, (20, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(root / name / f"{i}.png")


def test_image_classification_learns_and_reloads_exactly(tmp_path):
    _write_images(tmp_path / "imgs")
    loaded = tiny_effnet()
    metrics = train(
        "image-classification",
        base="tiny",
        data=str(tmp_path / "imgs"),
        out=tmp_path / "out",
        loaded=loaded,
        max_steps=10,
        lr=1e-2,
        batch_size=6,
        eval_split="0.34",
        image_size=32,
        rank=2,
        progress=False,
        threads=1,
    )
    assert metrics["labels"] == ["blue", "green", "red"]
    assert _falls(_losses(tmp_path / "out"))
    adapter = flora.load_adapter(tmp_path / "out")
    assert adapter.metadata["image_size"] == 32
    # Every conv of the network is adapted, the new head is saved whole.
    assert sum(1 for m in adapter.modules.values() if m.spec.kind == "conv2d") == 49
    assert adapter.full_modules() == ["classifier"]

    fresh = tiny_effnet()
    flora.apply_adapter(fresh.model, adapter)
    x = torch.randn(2, 3, 32, 32)
    loaded.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.model(x), loaded.model(x), rtol=0, atol=0)


def test_causal_lm_learns_answer_and_reloads_exactly(tmp_path):
    lines = [
        json.dumps(
            {"prompt": f"record : name {n} age {a}", "completion": f"{{ name : {n} , age : {a} }}"}
        )
        for n in ("ann", "bob")
        for a in range(1, 9)
    ]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    loaded = tiny_llama()
    metrics = train(
        "causal-lm",
        base="tiny",
        data=str(tmp_path / "c.jsonl"),
        out=tmp_path / "out",
        loaded=loaded,
        max_steps=12,
        lr=2e-2,
        batch_size=4,
        eval_split="0.25",
        progress=False,
        threads=1,
    )
    assert metrics["base_eval_exact_match"] == 0.0
    assert metrics["eval_loss"] < metrics["base_eval_loss"]
    assert _falls(_losses(tmp_path / "out"))
    assert metrics["trainable_params"] == 2 * (
        4 * (32 * 8 + 8 * 8 + 32 * 8)
        - 2 * 16 * 8  # q,o 32x32; k,v 16x32 (2 KV heads of 8)
        + 2 * (64 * 8 + 8 * 8 + 32 * 8)
        + (32 * 8 + 8 * 8 + 64 * 8)
    )

    fresh = tiny_llama()
    flora.apply_adapter(fresh.model, flora.load_adapter(tmp_path / "out"))
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    loaded.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            fresh.model(ids).logits, loaded.model(ids).logits, rtol=0, atol=0
        )


@pytest.mark.parametrize("resume_at", [4])
def test_resume_reproduces_uninterrupted_run(tmp_path, resume_at):
    rows = ["text,label"] + [f"good fine {i % 4},pos" for i in range(8)]
    rows += [f"bad poor {i % 4},neg" for i in range(8)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    common = dict(
        base="tiny",
        data=str(tmp_path / "d.csv"),
        max_steps=8,
        lr=2e-3,
        batch_size=4,
        eval_split="0.25",
        progress=False,
        threads=1,
        seed=3,
    )
    train("text-classification", out=tmp_path / "full", loaded=tiny_encoder(), **common)
    train(
        "text-classification",
        out=tmp_path / "part",
        loaded=tiny_encoder(),
        save_every=resume_at,
        **common,
    )
    ckpt = tmp_path / "part" / "checkpoints" / f"step-{resume_at:06d}"
    train(
        "text-classification",
        out=tmp_path / "resumed",
        loaded=tiny_encoder(),
        resume=ckpt,
        **common,
    )
    full = flora.load_adapter(tmp_path / "full")
    resumed = flora.load_adapter(tmp_path / "resumed")
    assert full.tensors.keys() == resumed.tensors.keys()
    for key, value in full.tensors.items():
        torch.testing.assert_close(resumed.tensors[key], value, rtol=0, atol=0)
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "full")
    assert (tmp_path / "full" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
