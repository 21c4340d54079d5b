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
