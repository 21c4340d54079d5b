"""PEFT LoRA import/export against the real peft package; LyCORIS LoCon export maths."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import flora
from flora.adapter import adapter_from_model, apply_adapter, load_adapter, save_adapter
from flora.errors import AdapterError
from flora.interop import (
    PEFT_OPTIONS_WITHOUT_EQUIVALENT,
    check_peft_exportable,
    from_peft,
    to_lycoris,
    to_peft,
)


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    return GPT2LMHeadModel(cfg).eval()


IDS = torch.tensor([[1, 5, 9, 33, 2, 60, 7]])


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def randomize_lora(model: nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)


@pytest.mark.parametrize("rslora", [False, True])
def test_from_peft_llama_matches_peft(tmp_path: Path, rslora: bool) -> None:
    base = tiny_llama()
    pristine = copy.deepcopy(base)
    plain = logits(base)
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj", "embed_tokens"],
        rank_pattern={"o_proj": 2},
        alpha_pattern={"v_proj": 3},
        use_rslora=rslora,
    )
    peft_model = get_peft_model(base, lora)
    randomize_lora(peft_model)
    want = logits(peft_model)
    peft_model.save_pretrained(tmp_path)
    assert not torch.allclose(want, plain, atol=1e-3)

    adapter = from_peft(tmp_path, base=pristine)
    assert adapter.modules["model.layers.0.self_attn.o_proj"].ranks == (2, 2)
    assert adapter.modules["model.embed_tokens"].spec.kind == "embedding"
    expected_v = 3 / (4**0.5 if rslora else 4)
    assert torch.allclose(
        adapter.core("model.layers.1.self_attn.v_proj"), torch.eye(4) * expected_v
    )
    apply_adapter(pristine, adapter)
    torch.testing.assert_close(logits(pristine), want, atol=1e-5, rtol=1e-5)

    # and through the FLoRA file format, bitwise the same adapter
    save_adapter(adapter, tmp_path / "imported.flora")
    again = load_adapter(tmp_path / "imported.flora")
    assert all(torch.equal(again.tensors[k], v) for k, v in adapter.tensors.items())


def flora_adapter_on(model: nn.Module, targets: list[str], rank_pattern: dict) -> nn.Module:
    cfg = flora.FloraConfig(target_modules=targets, rank=3, scale=1.7, rank_pattern=rank_pattern)
    flora.inject(model, cfg)
    torch.manual_seed(2)
    with torch.no_grad():
        for _, layer in flora.adapter_layers(model):
            layer.core.normal_()
    return model


def test_to_peft_llama_loads_in_peft(tmp_path: Path) -> None:
    base = tiny_llama()
    pristine = copy.deepcopy(base)
    model = flora_adapter_on(
        base,
        ["q_proj", "up_proj"],
        {"model.layers.1.mlp.up_proj": [6, 5], "model.layers.0.mlp.up_proj": [2, 6]},
    )
    want = logits(model)
    assert not torch.allclose(want, logits(pristine), atol=1e-3)
    to_peft(adapter_from_model(model, "tiny-llama"), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (5, 5)  # min(6, 5); the others padded to it
    weights = load_file(tmp_path / "adapter_model.safetensors")
    up0 = "base_model.model.model.layers.0.mlp.up_proj"
    assert not weights[f"{up0}.lora_A.weight"][2:].any()  # rank 2 = min(2, 6), zero rows
    assert weights[f"{up0}.lora_A.weight"][:2].abs().min() > 0
    assert weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (
        5,
        32,
    )
    peft_model = PeftModel.from_pretrained(pristine, tmp_path).eval()
    torch.testing.assert_close(logits(peft_model), want, atol=1e-5, rtol=1e-5)


def test_gpt2_conv1d_round_trip_through_peft(tmp_path: Path) -> None:
    base = tiny_gpt2()
    pristine = copy.deepcopy(base)
    check = copy.deepcopy(base)
    model = flora_adapter_on(base, ["c_attn", "c_proj"], {})
    assert {layer.kind for _, layer in flora.adapter_layers(model)} == {"hf_conv1d"}
    want = logits(model)
    to_peft(adapter_from_model(model, "tiny-gpt2"), tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["fan_in_fan_out"]
    peft_model = PeftModel.from_pretrained(pristine, tmp_path / "peft").eval()
    torch.testing.assert_close(logits(peft_model), want, atol=1e-5, rtol=1e-5)
    # back: PEFT -> FLoRA on a fresh copy of the base
    back = from_peft(tmp_path / "peft", base=check)
    assert back.modules["transformer.h.0.attn.c_attn"].spec.kind == "hf_conv1d"
    apply_adapter(check, back)
    torch.testing.assert_close(logits(check), want, atol=1e-5, rtol=1e-5)


def test_from_peft_refuses_wrong_base(tmp_path: Path) -> None:
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(flora.errors.UnknownModuleError):
        from_peft(tmp_path, base=tiny_gpt2())
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(flora.errors.AdapterConfigError, match="use_dora"):
        from_peft(tmp_path)


def test_from_peft_refuses_alora_and_every_variant_naming_the_option(tmp_path: Path) -> None:
    """aLoRA applies its update only from the invocation tokens on: imported as plain LoRA
    it would change every token (wrong maths), so it is refused like DoRA."""
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path)
    plain = json.loads((tmp_path / "adapter_config.json").read_text())
    assert from_peft(tmp_path).modules  # as PEFT wrote it (every option unset): imported
    values = {"alora_invocation_tokens": [60, 61], "layer_replication": [[0, 1]]}
    for option in PEFT_OPTIONS_WITHOUT_EQUIVALENT:
        value = values.get(option, True)
        (tmp_path / "adapter_config.json").write_text(json.dumps({**plain, option: value}))
        with pytest.raises(flora.errors.AdapterConfigError) as err:
            from_peft(tmp_path)
        assert str(err.value) == f"PEFT option {option}={value!r} has no exact FLoRA equivalent"
    assert "alora_invocation_tokens" in PEFT_OPTIONS_WITHOUT_EQUIVALENT


def test_check_peft_exportable_names_what_peft_cannot_hold() -> None:
    check_peft_exportable({"a": "linear", "b": "linear"}, [])
    for kinds, whole, message in [
        ({"e": "embedding"}, [], "module 'e' is embedding; PEFT LoRA export covers"),
        ({"a": "linear", "c": "hf_conv1d"}, [], "PEFT cannot mix Linear and Conv1D modules"),
        ({"a": "linear"}, ["head"], "trained module 'head' is not exported"),
    ]:
        with pytest.raises(AdapterError, match=f"^{message}"):
            check_peft_exportable(kinds, whole)


def test_to_peft_refuses_conv() -> None:
    model = flora_adapter_on(nn.Sequential(nn.Conv2d(3, 4, 3)), ["0"], {})
    with pytest.raises(AdapterError, match="to_lycoris"):
        to_peft(adapter_from_model(model, "conv"), "/nonexistent/never-written")


def locon_delta(t: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """LyCORIS Tucker-LoCon rebuild: dW[o,c,k..] = alpha/r * sum up[o,a] mid[a,b,k..] down[b,c]."""
    up, down = t[f"{prefix}.lora_up.weight"], t[f"{prefix}.lora_down.weight"]
    r = down.shape[0]
    scale = float(t[f"{prefix}.alpha"]) / r
    if f"{prefix}.lora_mid.weight" not in t:
        return scale * up @ down
    mid = t[f"{prefix}.lora_mid.weight"]
    up2, down2 = up.reshape(up.shape[0], r), down.reshape(r, down.shape[1])
    return scale * torch.einsum("oa,ab...,bc->oc...", up2, mid, down2)


def test_to_lycoris_is_exact_for_convs_and_refuses_groups(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(5, 6, 3), nn.Conv1d(6, 4, 5), nn.Flatten(), nn.Linear(7, 3))
    cfg = flora.FloraConfig(
        target_modules=["0", "1", "3"],
        rank=3,
        kernel_rank=2,
        scale=2.0,
        rank_pattern={"1": [2, 4, 3]},
    )
    flora.inject(model, cfg)
    with torch.no_grad():
        for _, layer in flora.adapter_layers(model):
            layer.core.normal_()
    path = to_lycoris(adapter_from_model(model, "conv"), tmp_path / "locon.safetensors")
    t = load_file(path)
    assert t["lycoris_0.lora_mid.weight"].shape == (3, 3, 3, 3)
    assert t["lycoris_1.lora_down.weight"].shape == (4, 6, 1)  # padded to max(2, 4)
    for name, layer in flora.adapter_layers(model):
        torch.testing.assert_close(
            locon_delta(t, f"lycoris_{name}"), layer.delta_weight(), atol=1e-5, rtol=1e-5
        )
    grouped = flora_adapter_on(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), ["0"], {})
    with pytest.raises(AdapterError, match="groups=2"):
        to_lycoris(adapter_from_model(grouped, "g"), tmp_path / "g.safetensors")
