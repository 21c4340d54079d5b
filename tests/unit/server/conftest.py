"""Engine fixtures built from `tiny_engine` helpers."""

from __future__ import annotations

import pytest
from tiny_engine import (
    make_char_tokenizer,
    make_flora_adapter,
    make_tiny_llama,
    merged_reference_model,
)
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture
def char_tokenizer() -> PreTrainedTokenizerFast:
    return make_char_tokenizer()


@pytest.fixture(params=["v1", "v2"])
def engine_kind(request) -> str:
    """Both text engines, for the tests of behaviour they must share (test_engine.make_engine
    builds either)."""
    return request.param


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two tiny-llama FLoRA adapters, "x" and "y" (a module may define its own set)."""
    tmp = tmp_path_factory.mktemp("adapters")
    return {"x": make_flora_adapter(1, tmp), "y": make_flora_adapter(2, tmp)}


@pytest.fixture(scope="module")
def refs(adapters):
    """Independent references: each adapter merged into a fresh tiny llama by flora's own
    merge, and the base (key None)."""
    return {
        "x": merged_reference_model(adapters["x"]),
        "y": merged_reference_model(adapters["y"]),
        None: make_tiny_llama(),
    }
