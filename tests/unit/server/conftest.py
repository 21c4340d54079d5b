"""Engine fixtures built from `tiny_engine` helpers."""

from __future__ import annotations

import pytest
from tiny_engine import make_char_tokenizer, make_tiny_llama
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
