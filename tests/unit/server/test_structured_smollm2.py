"""Structured output on the real SmolLM2-135M-Instruct: every `json_schema` answer of 50
prompts over 3 adapters (and the base), run together in mixed batches, parses and validates;
free rows in the same batches generate exactly what they generate alone."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
import torch
from tiny_engine import DictSource

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

SCHEMAS = [
    {
        "type": "object",
        "properties": {"answer": {"type": "boolean"}},
        "required": ["answer"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "n": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["color", "n"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,8}$"}},
        "required": ["name"],
        "additionalProperties": False,
    },
]
QUESTIONS = [
    "Is the sky blue?",
    "Pick a colour and a digit.",
    "What is your name?",
    "Is water wet?",
    "Name a fruit.",
    "Describe a cat in JSON.",
    "Give me a number.",
    "Is fire cold?",
    "Who wrote Hamlet?",
    "Say something.",
]
ADAPTERS = ["a1", "a2", "a3"]
# The longest answer the schemas allow (`{"color": "green", "n": 9}`, 26 ASCII characters;
# the name pattern keeps strings to 8 ASCII letters, so no escapes or multi-byte characters)
# and every token is at least one character: with one more for EOS no row runs out of room.
MAX_JSON_CHARS = 27


def _random_adapter(model, seed: int, tmp_path):
    import flora
    from flora.adapter import load_adapter, save_adapter

    flora.inject(model, flora.FloraConfig(target_modules=["q_proj", "v_proj"], rank=4))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in flora.adapter_layers(model):
            layer.core.copy_(torch.randn(layer.core.shape, generator=gen) * 0.05)
    path = save_adapter(model, tmp_path / f"a{seed}", base_model_id="smollm2-135m-instruct")
    flora.eject(model)
    return load_adapter(path)


def test_json_schema_rows_validate_in_mixed_adapter_batches(tmp_path) -> None:
    from flora.models import load
    from flora_server.engine.constraints import ConstraintSpec
    from flora_server.engine.llm_engine import LLMEngine
    from flora_server.engine.protocol import GenerationRequest, SamplingParams

    loaded = load("smollm2-135m-instruct")
    tok = loaded.preprocessor
    adapters = {n: _random_adapter(loaded.model, i + 1, tmp_path) for i, n in enumerate(ADAPTERS)}
    engine = LLMEngine(loaded, DictSource(adapters), max_batch_size=32, merge_after_steps=None)
    engine.start()

    def prompt(text: str) -> list[int]:
        chat = [{"role": "user", "content": text + " Answer in JSON."}]
        rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        return tok.encode(rendered, add_special_tokens=False)

    # 50 constrained rows cycling over schemas, questions and adapters (and the base),
    # plus 4 free rows whose output must not change when batched with them.
    jobs = []
    for i in range(50):
        adapter = [*ADAPTERS, None][i % 4]
        jobs.append((f"c{i}", QUESTIONS[i % len(QUESTIONS)], adapter, SCHEMAS[i % 3]))
    free = [(f"f{i}", QUESTIONS[i], ADAPTERS[i % 3], None) for i in range(4)]

    async def run(batch):
        while not engine.ready:
            await asyncio.sleep(0.05)

        async def one(rid, text, adapter, schema):
            req = GenerationRequest(
                rid,
                prompt(text),
                SamplingParams(max_new_tokens=MAX_JSON_CHARS + 1 if schema else 8),
                adapter,
            )
            if schema is not None:
                req.constraint = await engine.compile_constraint(
                    ConstraintSpec("json_schema", schema)
                )
            events = [e async for e in engine.generate(req)]
            return rid, events[-1]

        return dict(await asyncio.gather(*(one(*job) for job in batch)))

    try:
        alone = asyncio.run(run(free))
        mixed = asyncio.run(run(jobs + free))
    finally:
        asyncio.run(engine.shutdown(5))
    for rid, _, _, schema in jobs:
        finish = mixed[rid]
        pieces = [tok.decode([t]) for t in finish.token_ids]
        assert finish.reason == "eos", (rid, finish.reason, finish.generated_text, pieces)
        jsonschema.validate(json.loads(finish.generated_text), schema)
    for rid, *_ in free:
        assert mixed[rid].token_ids == alone[rid].token_ids, rid
    # the constraint matters: no free answer here is JSON of the first schema
    assert not any(mixed[r].generated_text.startswith('{"answer"') for r, *_ in free)
