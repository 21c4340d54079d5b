"""Tiny engine test helpers: a random Llama, a character-level tokenizer, adapters and an
in-memory AdapterSource (no downloads). Fixtures wrapping them live in conftest.py."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def make_char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character; ids 0-2 are <pad>, <eos>, <bos>."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_llama(seed: int = 0, vocab_size: int = 98, **config: Any) -> LlamaForCausalLM:
    """2 layers, hidden 64, float32, eval mode (``config``: other `LlamaConfig` settings).
    EOS id 1 is made unlikely so greedy runs go the full length unless a test wants
    otherwise."""
    torch.manual_seed(seed)
    llama = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
        tie_word_embeddings=False,
        **config,
    )
    model = LlamaForCausalLM(llama).eval()
    with torch.no_grad():
        # Spread the logits so greedy decisions are not near-ties (exact-token tests).
        model.lm_head.weight.mul_(8.0)
        model.lm_head.weight[1].fill_(0.0)
    return model


@dataclass
class TinyLoaded:
    """Stands in for flora.models.LoadedModel."""

    model: Any
    preprocessor: Any
    name: str = "tiny-llama"
    kind: str = "causal-lm"
    fingerprint: str = "sha256:tiny"
    labels: Any = None
    context_length: int = 256
    source_path: Any = None
    extra: dict = field(default_factory=dict)


TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def make_flora_adapter(seed: int, tmp_path, rank: int = 4, targets=None):
    """A FLoRA adapter for `make_tiny_llama()` with non-zero random cores, written with
    flora.save_adapter and read back with flora.load_adapter (the path the server uses)."""
    import flora
    from flora.adapter import load_adapter, save_adapter

    model = make_tiny_llama()
    flora.inject(model, flora.FloraConfig(target_modules=targets or TARGETS, rank=rank))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in flora.adapter_layers(model):
            layer.core.copy_(torch.randn(layer.core.shape, generator=gen) * 0.6)
    path = save_adapter(model, tmp_path / f"adapter-{seed}", base_model_id="tiny-llama")
    return load_adapter(path)


def merged_reference_model(adapter):
    """A fresh base with `adapter` applied through flora itself and merged into the
    weights: the independent reference for the engine's output."""
    import flora
    from flora.adapter import apply_adapter

    model = make_tiny_llama()
    apply_adapter(model, adapter, check_fingerprint=False)
    flora.merge(model)
    return model


class DictSource:
    """AdapterSource over a dict; `gates[id]` (a threading.Event) holds a load back."""

    def __init__(self, adapters: dict, gates: dict | None = None) -> None:
        self.adapters = dict(adapters)
        self.gates = gates or {}
        self.loads: list[str] = []

    def load(self, adapter_id: str):
        from flora.adapter import adapter_sha256
        from flora_server.engine.protocol import AdapterNotFoundError, LoadedAdapter

        gate = self.gates.get(adapter_id)
        if gate is not None:
            gate.wait(10)
        self.loads.append(adapter_id)
        if adapter_id not in self.adapters:
            raise AdapterNotFoundError(adapter_id)
        adapter = self.adapters[adapter_id]
        # As the registry does: the adapter with the digest of its content.
        return LoadedAdapter(adapter, adapter_sha256(adapter))

    def exists(self, adapter_id: str) -> bool:
        return adapter_id in self.adapters


class Held:
    """Holds the worker thread inside one iteration so that requests submitted meanwhile
    are admitted together, into one batched prefill."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.entered = threading.Event()
        self.release = threading.Event()
        self._apply = engine.cache.apply_invalidations
        engine.cache.apply_invalidations = self._hold  # type: ignore[method-assign]

    def _hold(self) -> None:
        self.engine.cache.apply_invalidations = self._apply  # once
        self.entered.set()
        assert self.release.wait(30)
        self._apply()

    def __enter__(self) -> Held:
        self.engine._wake()
        assert self.entered.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
