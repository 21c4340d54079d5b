"""flora-train's outputs in --out: no run picks up or sits beside another run's files,
resume continues only the run it belongs to, checkpoints are whole or absent, one run per
--out at a time, options that cannot work are refused before the base loads, files get
the usual 0644. Tiny random bases (train_tiny.py): a few seconds each."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from train_tiny import tiny_encoder, tiny_llama

import flora
from flora.train import api, cli, train
from flora.train.checkpoint import (
    LOCK_NAME,
    STATE_JSON,
    STATE_TENSORS,
    run_lock,
    save_checkpoint,
    step_checkpoints,
)
from flora.train.errors import TrainError
from flora.train.loop import check_adapters
from flora.train.options import TrainOptions

A_ROWS = [("good great nice", "pos"), ("bad awful poor", "neg")] * 8
B_ROWS = [("the film was fine", "cat"), ("no no no", "dog")] * 8


def _csv(path: Path, rows: list[tuple[str, str]]) -> str:
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    return str(path)


def _train(out: Path, data: str, **kw):
    opts = {"max_steps": 4, "lr": 4e-3, "batch_size": 4, "eval_split": "0.25", "threads": 1}
    opts.update({"progress": False, **kw})
    return train(
        "text-classification", base="tiny", data=data, out=out, loaded=tiny_encoder(), **opts
    )


@pytest.fixture
def tiny_bases(monkeypatch):
    bases = {"tiny-bert": tiny_encoder, "tiny-llama": tiny_llama}
    monkeypatch.setattr(api, "_load_base", lambda name: bases[name]())


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the base model is loaded: these checks must come first."""

    def refuse(name: str):
        pytest.fail(f"the base {name!r} was loaded before the check")

    monkeypatch.setattr(api, "_load_base", refuse)


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main([*argv, "--quiet"])
    return code, capsys.readouterr().err


def _one_line(code: int, err: str) -> str:
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("flora-train: error: "), err
    return lines[0].removeprefix("flora-train: error: ")


def _labels(directory: Path) -> list[str]:
    return json.loads((directory / "adapter_config.json").read_text())["labels"]


# -- a fresh run into a previous run's --out -----------------------------------------------


def test_fresh_run_over_previous_outputs_is_refused_and_overwrite_replaces_them(
    tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    a, b = _csv(tmp_path / "a.csv", A_ROWS), _csv(tmp_path / "b.csv", B_ROWS)
    _train(out, a, save_every=2)
    assert [d.name for d in step_checkpoints(out / "checkpoints")] == ["step-000002", "step-000004"]

    monkeypatch.setattr(api, "_load_base", lambda name: pytest.fail("loaded"))
    argv = ["text-classification", "--base", "tiny-bert", "--data", b, "--out", str(out)]
    assert _one_line(*_cli(capsys, *argv, "--max-steps", "2")) == (
        f"--out {out} holds a previous run's outputs (adapter_config.json, "
        "adapter.safetensors, metrics.json, loss.png, checkpoints/); continue that run with "
        "--resume latest, or replace them with --overwrite"
    )
    # A checkpoint there is resumed only if it is this run's (--data differs: refused) ...
    code, err = _cli(capsys, *argv, "--resume", "latest", "--max-steps", "2")
    assert _one_line(code, err).startswith(f"--resume {out / 'checkpoints' / 'step-000004'}: ")
    # ... and with none, --resume latest starts afresh: the same rule as without it.
    shutil.move(out / "checkpoints", tmp_path / "kept")
    code, err = _cli(capsys, *argv, "--resume", "latest", "--max-steps", "2")
    assert _one_line(code, err) == (
        f"--out {out} holds a previous run's outputs (adapter_config.json, "
        "adapter.safetensors, metrics.json, loss.png); replace them with --overwrite, or "
        "write to another --out"
    )
    shutil.move(tmp_path / "kept", out / "checkpoints")

    _train(out, b, max_steps=2, overwrite=True)
    assert [d.name for d in step_checkpoints(out / "checkpoints")] == ["step-000002"]
    assert _labels(out) == _labels(out / "checkpoints" / "step-000002") == ["cat", "dog"]
    state = json.loads((out / "checkpoints" / "step-000002" / STATE_JSON).read_text())
    assert state["run"]["data"]["spec"] == b
    assert sorted(p.name for p in out.iterdir()) == [
        LOCK_NAME,
        "adapter.safetensors",
        "adapter_config.json",
        "checkpoints",
        "loss.png",
        "metrics.json",
    ]


# -- resume continues its own run only --------------------------------------------------------


@pytest.mark.usefixtures("no_loading")
def test_resume_with_other_data_or_options_is_refused_before_loading(tmp_path, capsys):
    out = tmp_path / "out"
    a, b = _csv(tmp_path / "a.csv", A_ROWS), _csv(tmp_path / "b.csv", B_ROWS)
    _train(out, a, save_every=2)
    ckpt = out / "checkpoints" / "step-000004"
    argv = ["text-classification", "--base", "tiny-bert", "--out", str(out), "--resume", "latest"]
    same = ["--max-steps", "4", "--lr", "4e-3", "--batch-size", "4", "--eval-split", "0.25"]

    def ident(path: str) -> str:
        data = Path(path).read_bytes()
        return f"bytes {len(data)}, sha256 {hashlib.sha256(data).hexdigest()}"

    err = _one_line(*_cli(capsys, *argv, "--data", b, *same))
    assert err == (
        f"--resume {ckpt}: --data {b} is not what the checkpoint was trained on "
        f"({a}: {ident(a)}; now {ident(b)})"
    )
    Path(b).write_text(Path(a).read_text())  # the same bytes under another name: the same data
    err = _one_line(*_cli(capsys, *argv, "--data", b, *same, "--lr", "1e-3"))
    assert err == (
        f"--resume {ckpt}: the checkpoint was trained with --lr 0.004, this run has 0.001; "
        "resume with the checkpoint's options, or start afresh (--overwrite, no --resume)"
    )
    err = _one_line(*_cli(capsys, *argv, "--data", a, *same[:-1], "0.5"))
    assert err == (
        f"--resume {ckpt}: --eval-split 0.5 is not what the checkpoint was trained on "
        "(0.25: fraction 0.25; now fraction 0.5)"
    )


def test_checkpoint_without_a_run_record_still_must_have_the_labels(tmp_path):
    out = tmp_path / "out"
    a, b = _csv(tmp_path / "a.csv", A_ROWS), _csv(tmp_path / "b.csv", B_ROWS)
    _train(out, a, save_every=2)
    ckpt = out / "checkpoints" / "step-000004"
    state = json.loads((ckpt / STATE_JSON).read_text())
    del state["run"]  # as written by an older version
    (ckpt / STATE_JSON).write_text(json.dumps(state))
    with pytest.raises(TrainError) as err:
        _train(out, b, resume="latest")
    assert str(err.value) == (
        f'--resume {ckpt}: the checkpoint\'s labels ["neg", "pos"] differ from this run\'s '
        '["cat", "dog"]: its head would answer with the wrong classes'
    )
    metrics = _train(out, a, resume="latest", max_steps=6)  # its own data: resumes
    assert metrics["steps"] == 6 and _labels(out) == ["neg", "pos"]


# -- one run per --out -------------------------------------------------------------------------


@pytest.mark.usefixtures("no_loading")
def test_a_second_run_into_a_locked_out_is_refused_before_loading(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    a = _csv(tmp_path / "a.csv", A_ROWS)
    argv = ["text-classification", "--base", "tiny-bert", "--data", a, "--out", str(out)]
    with run_lock(out):
        assert _one_line(*_cli(capsys, *argv)) == (
            f"--out {out}: another flora-train run is writing to it (it holds {out / LOCK_NAME})"
        )
        # what run() takes: the authority, after the early probe
        with (
            pytest.raises(TrainError, match="another flora-train run is writing to it"),
            run_lock(out),
        ):
            pass
    with run_lock(out):  # released with its holder
        pass


# -- damaged checkpoints -----------------------------------------------------------------------


@pytest.mark.usefixtures("tiny_bases")
def test_damaged_checkpoint_is_one_error_line(tmp_path, capsys):
    a = _csv(tmp_path / "a.csv", A_ROWS)
    _train(tmp_path / "src", a, save_every=2)
    step = tmp_path / "src" / "checkpoints" / "step-000002"
    cases = {}
    for case in ("corrupt_tensors", "truncated_json", "no_rng"):
        cases[case] = tmp_path / case
        shutil.copytree(step, cases[case])
    (cases["corrupt_tensors"] / STATE_TENSORS).write_bytes(b"garbage")
    text = (cases["truncated_json"] / STATE_JSON).read_text()
    (cases["truncated_json"] / STATE_JSON).write_text(text[: len(text) // 2])
    tensors = st_load((cases["no_rng"] / STATE_TENSORS).read_bytes())
    del tensors["rng.torch"]
    (cases["no_rng"] / STATE_TENSORS).write_bytes(st_save(tensors))
    try:
        json.loads(text[: len(text) // 2])
    except ValueError as exc:
        json_error = str(exc)
    try:
        st_load(b"garbage")
    except Exception as exc:  # safetensors' own error type
        st_error = str(exc)
    want = {
        "corrupt_tensors": f"{STATE_TENSORS} is not a safetensors file ({st_error}): the "
        "checkpoint is damaged",
        "truncated_json": f"{STATE_JSON} is not valid JSON ({json_error}): the checkpoint is "
        "damaged",
        "no_rng": f"{STATE_TENSORS} holds no rng.torch (the RNG state) or a malformed one: "
        "the checkpoint is damaged",
    }
    for case, directory in cases.items():
        argv = ["text-classification", "--base", "tiny-bert", "--data", a, "--max-steps", "4"]
        argv += ["--lr", "4e-3", "--batch-size", "4", "--eval-split", "0.25", "--threads", "1"]
        code, err = _cli(
            capsys, *argv, "--out", str(tmp_path / f"o-{case}"), "--resume", str(directory)
        )
        assert _one_line(code, err) == f"--resume {directory}: {want[case]}", case


def test_a_checkpoint_is_whole_or_absent(tmp_path, monkeypatch):
    out = tmp_path / "out"
    a = _csv(tmp_path / "a.csv", A_ROWS)
    _train(out, a, save_every=2)
    root = out / "checkpoints"
    # A save cut off before its last file: no step directory, nothing left behind.
    import flora.train.checkpoint as checkpoint

    real = checkpoint.atomic_write

    def cut(path: Path, data: bytes) -> None:
        if path.name == STATE_JSON:
            raise KeyboardInterrupt
        real(path, data)

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    flora.inject(model, flora.FloraConfig(target_modules=["0"], rank=1))
    optimizer = torch.optim.AdamW(model.parameters())
    monkeypatch.setattr(checkpoint, "atomic_write", cut)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(root / "step-000009", model, optimizer, {"step": 9}, {})
    monkeypatch.setattr(checkpoint, "atomic_write", real)
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000004"]
    # A process killed mid-save leaves a hidden directory: never taken for a checkpoint,
    # removed by the next run.
    shutil.copytree(root / "step-000002", root / ".step-000006.tmp-dead")
    (root / ".step-000006.tmp-dead" / STATE_JSON).write_text("{")
    shutil.rmtree(root / "step-000004")
    metrics = _train(out, a, save_every=2, resume="latest")
    assert metrics["steps"] == 4
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000004"]


# -- options that cannot work ------------------------------------------------------------------

HEAD_TARGETS = [
    ("text-classification", ["--targets", "classifier"], "--targets selects 'classifier', "),
    ("image-classification", ["--targets", ".*classifier"], "--targets selects 'classifier', "),
    ("text-classification", ["--export", "peft"], "--export peft: "),
    ("image-classification", ["--export", "peft"], "--export peft: "),
]


@pytest.mark.usefixtures("no_loading")
@pytest.mark.parametrize(("recipe", "extra", "start"), HEAD_TARGETS)
def test_head_as_target_and_peft_export_of_a_head_are_refused_before_loading(
    tmp_path, capsys, recipe, extra, start
):
    argv = [recipe, "--base", "b", "--data", str(tmp_path / "d.csv"), "--out", str(tmp_path / "o")]
    err = _one_line(*_cli(capsys, *argv, *extra))
    if start.startswith("--targets"):
        assert err == (
            f"--targets selects 'classifier', the new head {recipe} trains whole: a module is "
            "either adapted or trained whole, not both; leave it out of --targets"
        )
    else:
        assert err == (
            f"--export peft: {recipe} trains its new head classifier whole, which a PEFT LoRA "
            "file (A/B weights only) cannot carry; PEFT export is for causal-lm adapters"
        )
    assert not (tmp_path / "o").exists()


def test_peft_export_of_an_embedding_adapter_is_refused_before_training(tmp_path):
    (tmp_path / "c.jsonl").write_text(
        "".join(json.dumps({"prompt": f"hi {i}", "completion": f"ok {i}"}) + "\n" for i in range(8))
    )
    out = tmp_path / "out"
    with pytest.raises(TrainError) as err:
        train(
            "causal-lm",
            base="tiny",
            data=str(tmp_path / "c.jsonl"),
            out=out,
            loaded=tiny_llama(),
            targets=["embed_tokens"],
            export="peft",
            max_steps=2,
            batch_size=2,
            eval_split="0.25",
            threads=1,
            progress=False,
        )
    assert str(err.value) == (
        "--export peft: module 'model.embed_tokens' is embedding; PEFT LoRA export covers "
        "Linear and transformers Conv1D only (conv: use to_lycoris)"
    )
    assert not (out / "adapter_config.json").exists()  # nothing was trained


def test_a_module_adapted_and_trained_whole_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    flora.inject(model, flora.FloraConfig(target_modules=["0", "1"], train_modules=["1"]))
    with pytest.raises(TrainError) as err:
        check_adapters(model, TrainOptions(recipe="r", base="b", data="d", out="o"))
    assert str(err.value) == (
        "--targets selects '1', which the recipe trains whole ('1' is in train_modules): a "
        "module is either adapted or trained whole, not both"
    )


# -- file modes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_output_file_gets_the_umask_mode(tmp_path, umask):
    """As open() would: 0o666 less the umask (a fixed 0o644 fails the 0o027 case)."""
    old = os.umask(umask)
    try:
        _train(tmp_path / "out", _csv(tmp_path / "a.csv", A_ROWS), save_every=2, eval_every=2)
    finally:
        os.umask(old)
    modes = {
        str(p.relative_to(tmp_path / "out")): oct(p.stat().st_mode & 0o777)
        for p in (tmp_path / "out").rglob("*")
        if p.is_file()
    }
    assert "adapter.safetensors" in modes and "best/adapter_config.json" in modes
    assert "checkpoints/step-000002/trainer_state.safetensors" in modes
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
