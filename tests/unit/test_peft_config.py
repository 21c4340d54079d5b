"""PEFT LoRA config fields on import: every badly typed field is an AdapterConfigError naming
it (a TypeError or re.error was a 500 at upload), rank_pattern / alpha_pattern keys select
modules exactly as PEFT's `get_pattern_key` does, and a key that makes Python's backtracking
`re` run for minutes is answered in well under a second."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils.other import get_pattern_key
from transformers import LlamaConfig, LlamaForCausalLM

from flora.errors import AdapterConfigError
from flora.interop import from_peft
from flora.peft_config import MAX_PATTERN_KEY_CHARS, MAX_PATTERN_KEYS, PatternKeys

Q0 = "model.layers.0.self_attn.q_proj"
V0 = "model.layers.0.self_attn.v_proj"
V1 = "model.layers.1.self_attn.v_proj"


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real PEFT LoRA (r=4, lora_alpha=8 on q_proj and v_proj) of a 2-layer Llama."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = get_peft_model(
        LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    out = tmp_path_factory.mktemp("peft")
    model.save_pretrained(out)
    return out


def with_config(peft_dir: Path, tmp_path: Path, patch: dict | None = None, raw: str = "") -> Path:
    """A copy of `peft_dir` whose config has `patch` applied (or is the text `raw`)."""
    out = tmp_path / "patched"
    out.mkdir(exist_ok=True)
    (out / "adapter_model.safetensors").write_bytes(
        (peft_dir / "adapter_model.safetensors").read_bytes()
    )
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(raw or json.dumps({**config, **(patch or {})}))
    return out


def scalings(adapter) -> dict[str, float]:  # type: ignore[no-untyped-def]
    return {name: adapter.core(name)[0, 0].item() for name in adapter.modules}


# (config patch, what the error must name); each was a 500 or silently accepted before.
BAD_FIELDS = [
    ({"lora_alpha": None}, "lora_alpha"),
    ({"lora_alpha": [1]}, "lora_alpha"),
    ({"lora_alpha": "8"}, "lora_alpha"),
    ({"lora_alpha": True}, "lora_alpha"),
    ({"lora_alpha": 10**400}, "lora_alpha must be finite"),
    ({"alpha_pattern": ["q_proj"]}, "alpha_pattern"),
    ({"alpha_pattern": {"q_proj": None}}, "alpha_pattern['q_proj']"),
    ({"alpha_pattern": {"q_proj": {"x": 1}}}, "alpha_pattern['q_proj']"),
    ({"alpha_pattern": {"(": 4}}, "alpha_pattern key '('"),
    ({"alpha_pattern": {"": 4}}, "alpha_pattern has an empty key"),
    ({"alpha_pattern": {"(?=v)v_proj": 4}}, "look-around"),
    ({"alpha_pattern": {r"(v)_proj\1": 4}}, "alpha_pattern key"),
    ({"rank_pattern": ["q_proj"]}, "rank_pattern"),
    ({"rank_pattern": {"q_proj": "4"}}, "rank_pattern['q_proj']"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj']"),
    ({"rank_pattern": {"q_proj": 2.5}}, "rank_pattern['q_proj']"),
    ({"rank_pattern": {"[": 4}}, "rank_pattern key '['"),
    ({"r": None}, "PEFT r must"),
    ({"use_rslora": "yes"}, "use_rslora"),
    ({"fan_in_fan_out": 1}, "fan_in_fan_out"),
    ({"target_modules": 3}, "target_modules"),
    ({"target_modules": ["q_proj", 1]}, "target_modules"),
    ({"base_model_name_or_path": {"id": 1}}, "base_model_name_or_path"),
    ({"task_type": []}, "task_type"),
    # the weights have rank 4 everywhere: PEFT could not load them at another rank
    ({"r": 8}, "the config's r says 8"),
    ({"rank_pattern": {"v_proj": 2}}, "rank_pattern['v_proj'] says 2"),
    ({"alpha_pattern": {"x" * (MAX_PATTERN_KEY_CHARS + 1): 4}}, "characters"),
    ({"alpha_pattern": {f"m{i}": 4 for i in range(MAX_PATTERN_KEYS + 1)}}, "keys"),
]


@pytest.mark.parametrize(("patch", "named"), BAD_FIELDS)
def test_badly_typed_fields_are_refused_naming_them(
    peft_dir: Path, tmp_path: Path, patch: dict, named: str
) -> None:
    with pytest.raises(AdapterConfigError) as info:
        from_peft(with_config(peft_dir, tmp_path, patch))
    assert named in str(info.value)


def test_json_infinity_by_overflow_is_refused(peft_dir: Path, tmp_path: Path) -> None:
    text = (peft_dir / "adapter_config.json").read_text()
    raw = text.replace('"lora_alpha": 8', '"lora_alpha": 1e999')
    assert raw != text  # strict JSON has no Infinity, but 1e999 parses as one
    with pytest.raises(AdapterConfigError, match="lora_alpha must be finite"):
        from_peft(with_config(peft_dir, tmp_path, raw=raw))


def test_patterns_set_each_modules_scaling_and_rank(peft_dir: Path, tmp_path: Path) -> None:
    alpha_pattern = {
        "layers.1.self_attn.v_proj": 2,
        "v.proj": 12,
        r"layers\.\d\.self_attn\.q_proj": 1,
    }
    rank_pattern = {"^model.layers.0.self_attn.q_proj": 4, "proj": 9}
    patch = {"alpha_pattern": alpha_pattern, "rank_pattern": rank_pattern}
    adapter = from_peft(with_config(peft_dir, tmp_path, patch))
    got = scalings(adapter)
    # first key in the file's order wins; "v.proj" reaches v_proj through PEFT's regex dot;
    # "proj" is no dotted suffix of any name, so r=4 holds where ^... does not match
    assert got[V1] == 2 / 4 and got[V0] == 12 / 4
    assert got[Q0] == got["model.layers.1.self_attn.q_proj"] == 1 / 4
    rs = from_peft(with_config(peft_dir, tmp_path, {**patch, "use_rslora": True}))
    assert scalings(rs)[V0] == pytest.approx(12 / 2)  # alpha / sqrt(r)


KEYS = [
    "q_proj",
    "self_attn.v_proj",
    "layers.1.self_attn.v_proj",
    "v.proj",  # PEFT's `.` is any character: v_proj, vXproj
    "xq_proj",
    "^model.layers.0.mlp.up_proj",
    r"layers\.[13]\.mlp\.(up|down)_proj",
    "mlp.*_proj",
    "lm_head",
]
NAMES = [
    Q0,
    V0,
    V1,
    "model.xq_proj",
    "q_proj",
    "model.vXproj",
    "model.layers.0.mlp.up_proj",
    "base.model.layers.0.mlp.up_proj",
    "model.layers.3.mlp.down_proj",
    "model.layers.2.mlp.down_proj",
    "model.layers.2.mlp.gate_proj",
    "lm_head",
    "model.lm_head_x",
    "model.embed_tokens",
]


@pytest.mark.parametrize("order", [1, -1])
def test_pattern_keys_select_what_peft_selects(order: int) -> None:
    keys = KEYS[::order]
    matcher = PatternKeys("alpha_pattern", keys)
    for name in NAMES:
        peft_key = get_pattern_key(keys, name)
        want = None if peft_key == name and name not in keys else peft_key
        assert matcher.key_for(name) == want, name
    # the cases a looser or stricter rule gets wrong
    assert PatternKeys("p", ["q_proj"]).key_for("model.xq_proj") is None
    assert PatternKeys("p", ["v.proj"]).key_for("model.vXproj") == "v.proj"
    assert PatternKeys("p", ["layers.0.q_proj"]).key_for("model.layers.0.q_proj") is not None
    assert PatternKeys("p", ["^layers.0.q_proj"]).key_for("model.layers.0.q_proj") is None


CHILD = textwrap.dedent(
    """
    import json, sys, time
    from flora.interop import from_peft
    start = time.perf_counter()
    adapter = from_peft(sys.argv[1])
    seconds = time.perf_counter() - start
    cores = {n: adapter.core(n)[0, 0].item() for n in adapter.modules}
    print(json.dumps({"seconds": seconds, "cores": cores}))
    """
)


def test_catastrophic_backtracking_key_is_answered_quickly(peft_dir: Path, tmp_path: Path) -> None:
    # On Python's re, `(.*.*)*z` against a 31-character name that does not end in z takes
    # minutes (16 characters: 20 s) and holds the GIL throughout, so it is run in a child
    # process that can be killed; the import itself must take well under a second.
    patch = {"alpha_pattern": {"(.*.*)*z": 4, "(.*.*)*v_proj": 2}}
    directory = with_config(peft_dir, tmp_path, patch)
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(directory)],
            capture_output=True,
            text=True,
            timeout=90,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("from_peft did not finish within 90 s on a backtracking pattern key")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["seconds"] < 5.0
    assert result["cores"][Q0] == 8 / 4  # no key matches: lora_alpha / r
    assert result["cores"][V0] == result["cores"][V1] == 2 / 4  # the second key matches
