"""Tiny random bases for the flora-train tests (no downloads, seconds on a CPU)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from flora import base_fingerprint
from flora.models import EfficientNetLite0, ImageTransform
from flora.models.types import LoadedModel, Pooling

SPECIALS = ["[PAD]", "[UNK]", "<|im_start|>", "<|im_end|>"]
WORDS = [
    "system",
    "user",
    "assistant",
    "good",
    "bad",
    "great",
    "awful",
    "fine",
    "nice",
    "poor",
    "yes",
    "no",
    "the",
    "a",
    "film",
    "movie",
    "was",
    "is",
    "record",
    ":",
    "{",
    "}",
    ",",
    '"',
    "name",
    "age",
    "city",
    "ann",
    "bob",
    "rome",
    "oslo",
    "1",
    "2",
    "3",
    "4",
    "5",
    "6",
    "7",
    "8",
    "9",
    "0",
    "reply",
    "ok",
    "hi",
]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace/punctuation word tokenizer over WORDS with a ChatML-like template."""
    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="<|im_end|>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    fast.chat_template = CHATML
    return fast


def tiny_encoder(seed: int = 0) -> LoadedModel:
    """A 2-layer, 32-wide random BERT as a text encoder (mean pooling, L2)."""
    torch.manual_seed(seed)
    tok = word_tokenizer()
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = BertModel(cfg).eval()
    return LoadedModel(
        name="tiny-bert",
        kind="text-encoder",
        model=model,
        preprocessor=tok,
        fingerprint=base_fingerprint(model),
        context_length=64,
        pooling=Pooling("mean", True),
    )


def tiny_llama(seed: int = 0) -> LoadedModel:
    """A 2-layer, 32-wide random Llama causal LM."""
    torch.manual_seed(seed)
    tok = word_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(cfg).eval()
    return LoadedModel(
        name="tiny-llama",
        kind="causal-lm",
        model=model,
        preprocessor=tok,
        fingerprint=base_fingerprint(model),
        context_length=128,
    )


def tiny_effnet(seed: int = 0) -> LoadedModel:
    """A random EfficientNet-Lite0 (the real architecture) with 3 outputs, 32 px inputs."""
    torch.manual_seed(seed)
    model = EfficientNetLite0(num_classes=3).eval()
    return LoadedModel(
        name="tiny-effnet",
        kind="image-classifier",
        model=model,
        preprocessor=ImageTransform(size=32),
        fingerprint=base_fingerprint(model),
    )
