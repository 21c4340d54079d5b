"""flora-train CLI: every bad-data case is one line on stderr and exit code 2."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from train_tiny import tiny_effnet, tiny_encoder, tiny_llama

from flora.train import api, cli
from flora.train.builtin import mnist5k_arrays, mnist5k_test_mask
from flora.train.data import stratified_split
from flora.train.schedule import batch_indices, lr_at
from flora.train.synthetic import eval_names, load_synthetic_instruct, train_names


@pytest.fixture
def tiny_bases(monkeypatch):
    bases = {"tiny-bert": tiny_encoder, "tiny-effnet": tiny_effnet, "tiny-llama": tiny_llama}
    monkeypatch.setattr(api, "_load_base", lambda name: bases[name]())


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main([*argv, "--quiet"])
    err = capsys.readouterr().err
    return code, err


def _text(tmp_path, content: str, name: str = "d.csv") -> str:
    (tmp_path / name).write_text(content)
    return str(tmp_path / name)


def _assert_one_line(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("flora-train: error: ")
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.usefixtures("tiny_bases")
def test_missing_file(tmp_path, capsys):
    code, err = _run(
        capsys,
        "text-classification",
        "--base",
        "tiny-bert",
        "--data",
        str(tmp_path / "nope.csv"),
        "--out",
        str(tmp_path / "o"),
    )
    _assert_one_line(code, err, "data file not found", "nope.csv")


@pytest.mark.usefixtures("tiny_bases")
def test_wrong_columns(tmp_path, capsys):
    data = _text(tmp_path, "sentence,label\ngood,pos\nbad,neg\n")
    code, err = _run(
        capsys,
        "text-classification",
        "--base",
        "tiny-bert",
        "--data",
        data,
        "--out",
        str(tmp_path / "o"),
    )
    _assert_one_line(code, err, "wrong columns", "need text, label", "found sentence, label")


@pytest.mark.usefixtures("tiny_bases")
def test_unknown_label_in_eval(tmp_path, capsys):
    data = _text(tmp_path, "text,label\ngood,pos\nbad,neg\nfine,pos\n")
    ev = _text(tmp_path, "text,label\ngreat,pos\nmeh,neutral\n", "e.csv")
    code, err = _run(
        capsys,
        "text-classification",
        "--base",
        "tiny-bert",
        "--data",
        data,
        "--eval-split",
        ev,
        "--out",
        str(tmp_path / "o"),
    )
    _assert_one_line(code, err, "unknown label in eval", "'neutral'")


@pytest.mark.usefixtures("tiny_bases")
def test_empty_set(tmp_path, capsys):
    data = _text(tmp_path, "text,label\n")
    code, err = _run(
        capsys,
        "text-classification",
        "--base",
        "tiny-bert",
        "--data",
        data,
        "--out",
        str(tmp_path / "o"),
    )
    _assert_one_line(code, err, "empty data set")


@pytest.mark.usefixtures("tiny_bases")
def test_unreadable_image(tmp_path, capsys):
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / cls / "ok.png")
    (tmp_path / "imgs" / "b" / "broken.png").write_bytes(b"not a png at all")
    code, err = _run(
        capsys,
        "image-classification",
        "--base",
        "tiny-effnet",
        "--data",
        str(tmp_path / "imgs"),
        "--out",
        str(tmp_path / "o"),
    )
    _assert_one_line(code, err, "unreadable image", "broken.png")


@pytest.mark.usefixtures("tiny_bases")
def test_bad_json_line_and_missing_answer(tmp_path, capsys):
    data = _text(tmp_path, '{"prompt": "hi", "completion": "ok"}\n{"prompt": \n', "c.jsonl")
    code, err = _run(
        capsys, "causal-lm", "--base", "tiny-llama", "--data", data, "--out", str(tmp_path / "o")
    )
    _assert_one_line(code, err, "c.jsonl:2", "not valid JSON")
    msgs = {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}
    data = _text(tmp_path, json.dumps(msgs) + "\n", "m.jsonl")
    code, err = _run(
        capsys, "causal-lm", "--base", "tiny-llama", "--data", data, "--out", str(tmp_path / "o")
    )
    _assert_one_line(code, err, "last message must be the assistant's")


@pytest.mark.usefixtures("tiny_bases")
def test_wrong_kind_of_builtin_data(tmp_path, capsys):
    code, err = _run(
        capsys,
        "text-classification",
        "--base",
        "tiny-bert",
        "--data",
        "builtin:mnist5k",
        "--out",
        str(tmp_path / "o"),
    )
    _assert_one_line(code, err, "builtin:mnist5k is image data")
    code, err = _run(
        capsys,
        "text-classification",
        "--base",
        "tiny-bert",
        "--data",
        "builtin:nope",
        "--out",
        str(tmp_path / "o"),
    )
    _assert_one_line(code, err, "unknown dataset builtin:nope", "builtin:mnist5k")


def test_lr_schedule_values():
    # 10 steps, 20% warm-up: 2 warm-up steps, then cosine over the remaining 8.
    assert [round(lr_at(s, 10, 1.0, 0.2), 6) for s in (0, 1, 2, 6)] == [0.5, 1.0, 1.0, 0.5]
    assert lr_at(9, 10, 1.0, 0.2) == pytest.approx(
        0.5 * (1 + __import__("math").cos(__import__("math").pi * 7 / 8))
    )


def test_batches_cover_each_epoch_once_and_depend_on_seed():
    epoch0 = [i for s in range(4) for i in batch_indices(10, 3, seed=1, step=s)]
    assert sorted(epoch0) == list(range(10))
    assert batch_indices(10, 3, seed=1, step=4) != batch_indices(10, 3, seed=2, step=4)
    assert batch_indices(10, 3, seed=1, step=5) == batch_indices(10, 3, seed=1, step=5)


def test_stratified_split_keeps_every_class_in_train():
    items = [("x", "a")] * 10 + [("y", "b")] * 3 + [("z", "c")]
    train, held = stratified_split(items, lambda p: p[1], 0.3, seed=0)
    assert sorted(lab for _, lab in held) == ["a", "a", "a", "b"]
    assert {lab for _, lab in train} == {"a", "b", "c"}


def test_mnist5k_split_is_fixed_and_stratified():
    pixels, labels = mnist5k_arrays()
    assert pixels.shape == (5000, 28, 28) and labels.shape == (5000,)
    mask = mnist5k_test_mask(labels)
    assert int(mask.sum()) == 1000
    for c in range(10):
        assert int((mask & (labels == c)).sum()) == 100


def test_synthetic_instruct_eval_is_disjoint_and_deterministic():
    a, b = load_synthetic_instruct(0), load_synthetic_instruct(0)
    assert a.train == b.train and a.eval == b.eval
    assert load_synthetic_instruct(1).train != a.train
    assert set(eval_names()).isdisjoint(train_names())
    assert {c[1]["content"] for c in a.eval}.isdisjoint({c[1]["content"] for c in a.train})
    answer = json.loads(a.eval[0][2]["content"])
    assert list(answer) == ["name", "age", "city"] and answer["name"] in eval_names()
    assert answer["name"] in a.eval[0][1]["content"]
