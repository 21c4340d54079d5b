"""The mixed-batch exactness property on the real SmolLM2-135M-Instruct (float32, CPU)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from test_engine_batch import greedy_alone
from tiny_engine import DictSource

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]
STEPS = 8
TARGETS = ["q_proj", "v_proj", "down_proj"]


def random_adapter(model, seed: int, tmp_path):
    """Inject rank-4 FLoRA with random cores, save and load it back, eject."""
    import flora
    from flora.adapter import load_adapter, save_adapter

    flora.inject(model, flora.FloraConfig(target_modules=TARGETS, rank=4))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in flora.adapter_layers(model):
            layer.core.copy_(torch.randn(layer.core.shape, generator=gen) * 0.02)
    path = save_adapter(model, tmp_path / f"a{seed}", base_model_id="smollm2-135m-instruct")
    flora.eject(model)
    return load_adapter(path)


def test_mixed_batch_on_smollm2_matches_flora_merge(tmp_path) -> None:
    import flora
    from flora.adapter import apply_adapter, remove_adapter
    from flora.models import load
    from flora_server.engine.llm_engine import LLMEngine
    from flora_server.engine.protocol import GenerationRequest, SamplingParams

    torch.manual_seed(0)
    ref = load("smollm2-135m-instruct")
    tok = ref.preprocessor
    adapters = {
        "x": random_adapter(ref.model, 1, tmp_path),
        "y": random_adapter(ref.model, 2, tmp_path),
    }
    texts = {"x": "What is the capital of France?", "y": "Name a colour.", "base": "Say hi."}
    prompts = {
        key: tok.encode(
            tok.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            ),
            add_special_tokens=False,
        )
        for key, text in texts.items()
    }
    expected = {"base": greedy_alone(ref.model, prompts["base"], STEPS)}
    for key in ("x", "y"):
        apply_adapter(ref.model, adapters[key])
        flora.merge(ref.model)
        expected[key] = greedy_alone(ref.model, prompts[key], STEPS)
        remove_adapter(ref.model)
    assert expected["x"] != greedy_alone(ref.model, prompts["x"], STEPS)  # the adapter matters

    engine = LLMEngine(load("smollm2-135m-instruct"), DictSource(adapters), merge_after_steps=None)
    engine.start()

    async def mixed():
        while not engine.ready:
            await asyncio.sleep(0.05)

        async def one(key):
            req = GenerationRequest(
                key,
                prompts[key],
                SamplingParams(max_new_tokens=STEPS),
                None if key == "base" else key,
            )
            events = [e async for e in engine.generate(req)]
            return key, list(events[-1].token_ids)

        return dict(await asyncio.gather(*(one(k) for k in ("x", "y", "base"))))

    try:
        got = asyncio.run(mixed())
    finally:
        asyncio.run(engine.shutdown(5))
    assert got == expected
