"""A tiny LlamaForCausalLM served with 3 adapters in one mixed batch == each row alone
through the model with its adapter applied by flora.apply_adapter."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flora import FloraConfig, apply_adapter, inject, remove_adapter
from flora.adapter.io import adapter_from_model
from flora.injection import adapter_layers
from flora.serving import ServingModel

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = [
    FloraConfig(target_modules=PROJ, rank=4, scale=1.0),
    FloraConfig(target_modules=["q_proj", "v_proj", "embed_tokens"], rank=8, scale=2.0),
    FloraConfig(
        target_modules=["o_proj", "down_proj"], rank=3, rank_pattern={"o_proj": [2, 6]}, scale=0.5
    ),
]


# transformers renamed past_key_values -> cache (5.2x); accept either
CACHE_KWARG = (
    "cache"
    if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters
    else "past_key_values"
)


def tiny_llama() -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def make_adapter(base: LlamaForCausalLM, config: FloraConfig, seed: int):
    model = copy.deepcopy(base)
    inject(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.core.copy_(torch.randn(layer.core.shape, generator=gen) * 0.5)
    return adapter_from_model(model, "tiny-llama")


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    base = tiny_llama()
    adapters = [make_adapter(base, c, seed=i) for i, c in enumerate(CONFIGS)]
    return base, adapters


def alone(base, adapter, ids: torch.Tensor) -> torch.Tensor:
    model = copy.deepcopy(base)
    if adapter is not None:
        apply_adapter(model, adapter)
    with torch.no_grad():
        logits = model(ids).logits
    if adapter is not None:
        remove_adapter(model)
    return logits


def test_mixed_batch_prefill_and_decode_match_each_row_alone(setup) -> None:
    base, adapters = setup
    rows = [0, 1, None, 2, 1, 0]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (len(rows), 7), generator=gen)
    serving = ServingModel(copy.deepcopy(base), max_slots=4)
    for slot, adapter in enumerate(adapters):
        serving.load(slot, adapter)
    serving.set_routing(rows)
    with torch.no_grad():
        prefill = serving(ids[:, :6], use_cache=True)
        decode = serving(ids[:, 6:], **{CACHE_KWARG: prefill.past_key_values}).logits
    for b, slot in enumerate(rows):
        want = alone(base, None if slot is None else adapters[slot], ids[b : b + 1])
        torch.testing.assert_close(prefill.logits[b], want[0, :6], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(decode[b], want[0, 6:], atol=1e-5, rtol=1e-5)
    # adapters really move the logits, and differently per adapter
    plain = alone(base, None, ids[:1])
    assert (prefill.logits[0] - plain[0, :6]).abs().max() > 1e-2


def test_merged_homogeneous_batch_matches_batched_and_restores(setup) -> None:
    base, adapters = setup
    ids = torch.randint(0, 100, (3, 5), generator=torch.Generator().manual_seed(2))
    serving = ServingModel(copy.deepcopy(base), max_slots=2)
    serving.load(0, adapters[0])
    serving.load(1, adapters[1])
    before = {k: v.clone() for k, v in serving.model.state_dict().items()}
    serving.set_routing([1, 1, 1])
    with torch.no_grad():
        batched = serving(ids).logits
        serving.merge(1)
        merged = serving(ids).logits
        serving.unmerge()
    torch.testing.assert_close(merged, batched, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, alone(base, adapters[1], ids), atol=1e-5, rtol=1e-5)
    after = serving.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_adapter_replacing_whole_modules_is_refused(setup) -> None:
    base, _ = setup
    model = copy.deepcopy(base)
    inject(model, FloraConfig(target_modules=["q_proj"], rank=2, train_modules=["lm_head"]))
    adapter = adapter_from_model(model, "tiny-llama")
    serving = ServingModel(copy.deepcopy(base), max_slots=1)
    with pytest.raises(ValueError, match="lm_head"):
        serving.load(0, adapter)
    assert serving.slot_modules(0) is None and serving.wrapped_modules() == []
