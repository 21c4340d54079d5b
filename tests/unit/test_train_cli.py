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


# --- bad options: exit 2, one line naming the flag, before any model or data is loaded ---


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the base model is loaded: option checks must come first."""

    def refuse(name: str):
        pytest.fail(f"the base {name!r} was loaded before the options were checked")

    monkeypatch.setattr(api, "_load_base", refuse)


# (recipe, extra argv, the whole error message). --data names a file that does not exist:
# reading the data before checking the options would report that instead.
BAD_OPTIONS = [
    ("image-classification", ["--image-size", "-5"], "--image-size must be >= 1, got -5"),
    ("image-classification", ["--image-size", "0"], "--image-size must be >= 1, got 0"),
    ("text-classification", ["--max-length", "-1"], "--max-length must be >= 1, got -1"),
    ("text-classification", ["--max-length", "0"], "--max-length must be >= 1, got 0"),
    (
        "text-classification",
        ["--weight-decay", "-1"],
        "--weight-decay must be a finite number >= 0, got -1.0",
    ),
    (
        "text-classification",
        ["--weight-decay", "inf"],
        "--weight-decay must be a finite number >= 0, got inf",
    ),
    ("text-classification", ["--scale", "nan"], "--scale: scale must be finite, got nan"),
    ("text-classification", ["--scale", "inf"], "--scale: scale must be finite, got inf"),
    (
        "causal-lm",
        ["--scale", "0"],
        "--scale must not be 0 (the update and its gradients would be 0)",
    ),
    ("causal-lm", ["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    ("causal-lm", ["--epochs", "inf"], "--epochs must be a finite number > 0, got inf"),
    ("causal-lm", ["--rank", "0"], "--rank: rank must be an integer >= 1, got 0"),
    (
        "image-classification",
        ["--kernel-rank", "0"],
        "--kernel-rank: kernel_rank must be an integer >= 1, got 0",
    ),
    (
        "text-classification",
        ["--targets", "("],
        "--targets: target_modules is not a valid regex: "
        "missing ), unterminated subpattern at position 0",
    ),
    (
        "text-classification",
        ["--eval-split", "1.5"],
        "--eval-split fraction must be in (0, 1), got 1.5",
    ),
]


@pytest.mark.usefixtures("no_loading")
@pytest.mark.parametrize(("recipe", "extra", "message"), BAD_OPTIONS)
def test_bad_option_is_one_line_naming_its_flag(tmp_path, capsys, recipe, extra, message):
    argv = [recipe, "--base", "b", "--data", str(tmp_path / "absent.csv")]
    code, err = _run(capsys, *argv, "--out", str(tmp_path / "o"), *extra)
    assert code == 2
    assert err == f"flora-train: error: {message}\n"
    assert not (tmp_path / "o").exists()  # nothing created


@pytest.mark.usefixtures("no_loading")
def test_out_that_is_a_file_fails_before_loading(tmp_path, capsys):
    data = _text(tmp_path, "text,label\ngood,pos\nbad,neg\n")
    argv = ["text-classification", "--base", "b", "--data", data]
    code, err = _run(capsys, *argv, "--out", data)
    assert code == 2
    assert err == f"flora-train: error: --out {data}: {data} exists and is not a directory\n"
    code, err = _run(capsys, *argv, "--out", f"{data}/run")  # a file on the way
    assert code == 2
    assert err == f"flora-train: error: --out {data}/run: {data} exists and is not a directory\n"


@pytest.mark.usefixtures("no_loading")
def test_resume_that_is_no_checkpoint_fails_before_loading(tmp_path, capsys):
    argv = ["causal-lm", "--base", "b", "--data", "d.jsonl", "--out", str(tmp_path / "o")]
    code, err = _run(capsys, *argv, "--resume", str(tmp_path / "nockpt"))
    assert code == 2
    assert err == (
        f"flora-train: error: --resume {tmp_path / 'nockpt'}: not a checkpoint "
        "(no trainer_state.json)\n"
    )


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    # Only TrainError is a user's mistake; anything else must not be hidden as exit 2.
    def broken(name: str):
        raise RuntimeError("a bug")

    monkeypatch.setattr(api, "_load_base", broken)
    argv = ["causal-lm", "--base", "b", "--data", "d.jsonl", "--out", str(tmp_path / "o")]
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main([*argv, "--quiet"])


def test_options_none_takes_the_default_and_zero_is_refused():
    from flora.train.errors import TrainError
    from flora.train.options import RecipeDefaults, TrainOptions

    opts = TrainOptions(recipe="r", base="b", data="d", out="o", image_size=None, scale=None)
    resolved = opts.resolved(RecipeDefaults(targets="auto", lr=1.0, batch_size=2, scale=2.5))
    assert resolved.scale == 2.5 and resolved.image_size is None
    for name in ("image_size", "max_length", "batch_size", "max_steps", "keep_checkpoints"):
        with pytest.raises(TrainError, match=f"^--{name.replace('_', '-')} must be >= 1, got 0$"):
            TrainOptions(recipe="r", base="b", data="d", out="o", **{name: 0})


# --- column mapping: a named column that is not there is an error, never ignored ---------


@pytest.mark.usefixtures("tiny_bases")
def test_mapped_column_missing_from_csv_names_it_and_the_header(tmp_path, capsys):
    data = _text(tmp_path, "text,label\ngood,pos\nbad,neg\nfine,pos\nawful,neg\n")
    argv = ["text-classification", "--base", "tiny-bert", "--data", data, "--eval-split", "0.5"]
    code, err = _run(capsys, *argv, "--out", str(tmp_path / "o"), "--text-column", "nope")
    assert code == 2
    assert err == (
        f"flora-train: error: {data}: --text-column 'nope': no such column (columns: text, label)\n"
    )


def test_mapped_column_missing_from_json_line_or_unmappable_data(tmp_path):
    from flora.train.data import load_text_labels
    from flora.train.errors import DataError
    from flora.train.image_data import load_image_labels

    rows = [{"sentence": "good", "label": "pos"}, {"text": "bad", "label": "neg"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    message = f"{path}:2: --text-column 'sentence': no such column (columns: text, label)"
    with pytest.raises(DataError) as err:
        load_text_labels(path, {"text": "sentence"})
    assert str(err.value) == message
    csv_path = tmp_path / "s.csv"
    csv_path.write_text("sentence,label\ngood,pos\n")
    assert load_text_labels(csv_path, {"text": "sentence"}) == [("good", "pos")]
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    with pytest.raises(DataError) as err:
        load_image_labels(tmp_path / "imgs", {"path": "file"})
    assert str(err.value) == (
        f"--path-column: {tmp_path / 'imgs'} is an image folder (one sub-folder per class) "
        "and has no columns to map"
    )


@pytest.mark.usefixtures("tiny_bases")
def test_column_mapping_on_builtin_data_is_refused(tmp_path, capsys):
    argv = ["text-classification", "--base", "tiny-bert", "--data", "builtin:chatterbot-topics"]
    code, err = _run(capsys, *argv, "--out", str(tmp_path / "o"), "--label-column", "topic")
    assert code == 2
    assert err == (
        "flora-train: error: --label-column: builtin:chatterbot-topics is a builtin data set "
        "and has no columns to map\n"
    )


def test_max_length_must_leave_room_after_special_tokens():
    from types import SimpleNamespace

    from flora.train.errors import TrainError
    from flora.train.text_classification import text_max_length

    tokenizer = SimpleNamespace(num_special_tokens_to_add=lambda pair: 2)  # [CLS] .. [SEP]
    loaded = SimpleNamespace(name="enc", preprocessor=tokenizer, context_length=512)
    with pytest.raises(TrainError) as err:
        text_max_length(2, loaded)  # type: ignore[arg-type]
    assert str(err.value) == (
        "--max-length must be > 2 for enc: its tokenizer adds 2 special tokens to every text, got 2"
    )
    assert text_max_length(3, loaded) == 3  # type: ignore[arg-type]
    assert text_max_length(4096, loaded) == 512  # type: ignore[arg-type]


def test_out_dir_that_cannot_be_created_is_a_train_error(tmp_path):
    # make_out_dir guards the run itself (a file appearing after check_paths ran).
    from flora.train.errors import TrainError
    from flora.train.loop import make_out_dir

    blocker = tmp_path / "taken"
    blocker.write_text("x")
    with pytest.raises(TrainError) as err:
        make_out_dir(blocker)
    assert str(err.value) == f"--out {blocker}: cannot create it (File exists)"
    make_out_dir(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()


@pytest.mark.usefixtures("tiny_bases")
def test_data_that_ended_in_tracebacks_is_one_line(tmp_path, capsys):
    good = "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in [("good", "pos")] * 3)
    good += "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in [("bad", "neg")] * 3)
    cases = {
        "s.jsonl": (good + '{"text": "a\\ud800b", "label": "pos"}\n', "s.jsonl:7: the text"),
        "d.jsonl": ('{"text": "a", "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n", "d.jsonl:1"),
        "l.jsonl": (good + json.dumps({"text": "x", "label": "--1"}) + "\n", None),
    }
    for name, (content, fragment) in cases.items():
        data = _text(tmp_path, content, name)
        argv = ["text-classification", "--base", "tiny-bert", "--data", data, "--max-steps", "1"]
        code, err = _run(
            capsys, *argv, "--out", str(tmp_path / ("o-" + name)), "--eval-split", "0.4"
        )
        if fragment is None:  # a label that is not a number is a name, not a crash
            assert code == 0, err
            config = json.loads((tmp_path / ("o-" + name) / "adapter_config.json").read_text())
            assert config["labels"] == ["--1", "neg", "pos"]  # names by code point: "-" < "n"
        else:
            _assert_one_line(code, err, fragment)
