"""flora-train's data files: label ids in one documented order, CSV and JSON Lines parsed
as their formats say (never silently mis-parsed), and every bad row refused with one
DataError naming the file and the row."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flora.train.data import encode_labels, load_chats, load_text_labels
from flora.train.errors import DataError
from flora.train.image_data import load_image_labels
from flora.train.options import TrainOptions
from flora.train.sources import labelled_data


def _refused(load, path, *args) -> str:
    with pytest.raises(DataError) as err:
        load(path, *args)
    return str(err.value)


# --- label ids -------------------------------------------------------------------------


def test_label_ids_follow_one_total_order():
    # integers by value first (ties by code points), then every other name by code points
    labels = ["b", "10", "\u00b2", "--1", "1", "B", "-2", "01", "1.5"]
    train = [(i, name) for i, name in enumerate(labels)]
    enc_train, enc_eval, names = encode_labels(train, [("e", "--1")], "d.csv")
    assert names == ["-2", "01", "1", "10", "--1", "1.5", "B", "b", "\u00b2"]
    assert enc_train[0] == (0, 7) and enc_eval == [("e", 4)]
    assert encode_labels(train[::-1], [("e", "1")], "d.csv")[2] == names


def test_label_ids_do_not_depend_on_the_hash_seed():
    # "1" and "01" tie by value; they were ordered by set iteration, i.e. by PYTHONHASHSEED
    # (seeds 0 and 5 gave opposite ids, so a resumed run swapped the head's classes).
    code = (
        "from flora.train.data import encode_labels\n"
        "print(encode_labels([(0, '1'), (1, '01')], [(0, '1')], 'd')[2])"
    )
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed in ("0", "5")
    ]
    assert [run.communicate()[0] for run in runs] == ["['01', '1']\n"] * 2


def test_unknown_eval_label_names_the_eval_file(tmp_path):
    train, ev = tmp_path / "train.csv", tmp_path / "ev.csv"
    train.write_text("text,label\ngood,pos\nbad,neg\nfine,pos\n")
    ev.write_text("text,label\ngreat,pos\nmeh,neutral\n")
    opts = TrainOptions(recipe="text-classification", base="b", data=str(train), out=tmp_path)
    opts.eval_split = str(ev)
    with pytest.raises(DataError) as err:
        labelled_data(opts, "text", load_text_labels)
    assert str(err.value) == (
        f"{ev}: unknown label in eval: 'neutral' never occurs in training ({train})"
    )


# --- CSV --------------------------------------------------------------------------------


def test_csv_row_with_more_fields_than_the_header_is_refused(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\ngood,pos\ngood, really good,pos\n")
    assert _refused(load_text_labels, path) == (
        f"{path}:3: 3 fields, the header has 2 (quote a field that holds ',')"
    )


def test_csv_header_naming_a_column_twice_is_refused(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label,label\ngood,pos,neg\nbad,neg,pos\n")
    assert _refused(load_text_labels, path) == f"{path}:1: the header names column 'label' twice"


def test_empty_label_is_refused_in_csv_and_json(tmp_path):
    csv_path, jsonl = tmp_path / "d.csv", tmp_path / "d.jsonl"
    csv_path.write_text("text,label\ngood,pos\ngood good,\n")
    jsonl.write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": " "}\n')
    assert _refused(load_text_labels, csv_path) == f"{csv_path}:3: empty label"
    assert _refused(load_text_labels, jsonl) == f"{jsonl}:2: empty label"


def test_csv_quoted_fields_keep_their_line_breaks_and_rows_their_line_numbers(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(
        '\ufefftext,label\r\n"good\nsecond line",pos\r\n"a\u2028b\r\nc",neg\r\nx,\r\n'.encode()
    )
    # the BOM is not part of the first column's name; the empty label is on line 6
    assert _refused(load_text_labels, path) == f"{path}:6: empty label"
    path.write_bytes(path.read_bytes().replace(b"x,\r\n", b""))
    assert load_text_labels(path) == [("good\nsecond line", "pos"), ("a\u2028b\r\nc", "neg")]


def test_csv_with_a_bom_names_its_columns_without_it(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("\ufeffsentence,label\ngood,pos\n")
    assert _refused(load_text_labels, path) == (
        f"{path}: wrong columns: need text, label, found sentence, label"
    )


# --- JSON Lines / JSON ------------------------------------------------------------------


def test_json_lines_end_at_newlines_only(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": "a\u2028b", "label": "x"}, {"text": "c\x85d\u2029", "label": "y"}]
    text = "\ufeff" + "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n"
    path.write_text(text, newline="")
    assert load_text_labels(path) == [("a\u2028b", "x"), ("c\x85d\u2029", "y")]


def test_lone_surrogate_is_refused_at_load_naming_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "good", "label": "pos"}\n{"text": "a\\ud800b", "label": "neg"}\n')
    assert _refused(load_text_labels, path) == f"{path}:2: the text holds a lone surrogate U+D800"
    chats = tmp_path / "c.jsonl"
    chats.write_text(
        '{"prompt": "hi", "completion": "ok"}\n{"prompt": "\\udfff", "completion": "x"}\n'
    )
    assert _refused(load_chats, chats) == f"{chats}:2: the content holds a lone surrogate U+DFFF"


def test_deeply_nested_json_is_one_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "b", "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    assert _refused(load_text_labels, path) == f"{path}:1: JSON nested too deeply"
    array = tmp_path / "d.json"
    array.write_text("[" * 100_000 + "]" * 100_000)
    assert _refused(load_text_labels, array) == f"{array}: JSON nested too deeply"


def test_text_and_label_type_errors_name_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    good = '{"text": "good", "label": "pos"}\n'
    path.write_text(good + '{"text": 123, "label": "neg"}\n')
    assert _refused(load_text_labels, path) == (
        f"{path}:2: the text must be a non-empty string, got int 123"
    )
    path.write_text(good + '{"text": "bad", "label": 1.0}\n')
    assert _refused(load_text_labels, path) == (
        f"{path}:2: the label must be a string or an integer, got float 1.0"
    )
    array = tmp_path / "d.json"
    array.write_text('[{"text": "good", "label": "pos"}, {"text": "bad", "label": null}]')
    assert _refused(load_text_labels, array) == (
        f"{array}: item 2: the label must be a string or an integer, got null"
    )


# --- Hugging Face datasets ----------------------------------------------------------------


def test_hf_image_labels_that_are_floats_or_null_are_refused(tmp_path):
    datasets = pytest.importorskip("datasets")
    import io

    from PIL import Image

    def png(v: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (4, 4), (v, v, v)).save(buf, "PNG")
        return buf.getvalue()

    cells = [{"bytes": png(20 * i), "path": None} for i in range(4)]
    floats, nulls, ints = (tmp_path / f"{n}.parquet" for n in ("f", "n", "i"))
    datasets.Dataset.from_dict({"image": cells, "label": [0.5, 1.0, 1.5, 0.5]}).to_parquet(floats)
    datasets.Dataset.from_dict({"image": cells, "label": [1, 2, None, 1]}).to_parquet(nulls)
    datasets.Dataset.from_dict({"image": cells, "label": [3, 2, 3, 2]}).to_parquet(ints)
    assert _refused(load_image_labels, floats) == (
        f"{floats}: train[0]: the label must be a string or an integer, got float 0.5"
    )
    assert _refused(load_image_labels, nulls) == (
        f"{nulls}: train[2]: the label must be a string or an integer, got null"
    )
    loaded = load_image_labels(ints)
    assert loaded is not None and [label for _, label in loaded] == ["3", "2", "3", "2"]


def test_hf_dataset_dict_without_rows_or_splits_is_one_error(tmp_path):
    datasets = pytest.importorskip("datasets")
    empty = datasets.Dataset.from_dict({"text": [], "label": []})
    datasets.DatasetDict({"train": empty}).save_to_disk(str(tmp_path / "empty"))
    datasets.DatasetDict({}).save_to_disk(str(tmp_path / "none"))
    assert _refused(load_text_labels, tmp_path / "empty") == (
        f"{tmp_path / 'empty'}: cannot read as a Hugging Face dataset: a split has no rows"
    )
    assert _refused(load_text_labels, tmp_path / "none") == (
        f"{tmp_path / 'none'}: no splits (an empty DatasetDict)"
    )
