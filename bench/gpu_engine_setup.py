"""What `bench/gpu_engine.py` runs on: SmolLM2-135M's shapes with random weights (no
weight files travel to the GPU machine), random rank-8 FLoRA adapters on every
projection, and the real `PagedLLMEngine` over them, token ids fed directly (a stand-in
tokenizer only detokenizes). `DRY` is the CPU dry run's tiny sizes.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Sizes:
    layers: int = 30
    hidden: int = 576
    intermediate: int = 1536
    heads: int = 9
    kv_heads: int = 3
    vocab: int = 49152
    batches: tuple[int, ...] = (32, 128)
    adapters: int = 32
    rank: int = 8
    prompt: int = 128
    new_tokens: int = 128
    rounds: int = 3
    prefix: int = 600
    question: int = 24
    prefix_rounds: int = 3
    long_prompt: int = 3500  # prefill_stall's prompt, beside 4 decoding streams
    kv_cache_bytes: int = 4 << 30
    token_budget: int = 2048


DRY = Sizes(
    layers=3,  # more than graph_check's two: it loads only the layers it keeps
    hidden=64,
    intermediate=128,
    heads=4,
    kv_heads=2,
    vocab=512,
    batches=(4, 8),
    adapters=4,
    rank=4,
    prompt=8,
    new_tokens=24,
    rounds=2,
    prefix=40,
    question=4,
    prefix_rounds=1,
    long_prompt=100,
    kv_cache_bytes=16 << 20,
    token_budget=64,
)


class IdTokenizer:
    """What the engine asks of a tokenizer when ids come in directly: EOS and text."""

    eos_token_id = 2
    bos_token = None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


@dataclass
class Loaded:
    model: Any
    name: str = "smollm2-135m-shapes-random"
    context_length: int = 8192
    preprocessor: Any = field(default_factory=IdTokenizer)


def build_model(sizes: Sizes) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=sizes.vocab,
        hidden_size=sizes.hidden,
        intermediate_size=sizes.intermediate,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.kv_heads,
        head_dim=sizes.hidden // sizes.heads,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def make_adapters(model: Any, sizes: Sizes, targets: list[str] | None = None) -> dict[str, Any]:
    """`sizes.adapters` random FLoRA adapters on `targets` (default: every projection,
    `PROJ`): inject, random cores, save, load back."""
    import flora
    from flora.adapter import load_adapter, save_adapter

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(sizes.adapters):
            config = flora.FloraConfig(target_modules=targets or PROJ, rank=sizes.rank)
            flora.inject(model, config)
            gen = torch.Generator().manual_seed(1000 + i)
            with torch.no_grad():
                for _, layer in flora.adapter_layers(model):
                    layer.core.copy_(torch.randn(layer.core.shape, generator=gen) * 0.05)
            path = save_adapter(model, Path(tmp) / f"a{i}", base_model_id="random")
            flora.eject(model)
            out[f"a{i}"] = load_adapter(path)
    return out


def start_engine(model: Any, adapters: dict, sizes: Sizes, graphs: str, dry: bool) -> Any:
    from flora_server.engine.paged.capture import RecordedCapture
    from flora_server.engine.paged.engine import PagedLLMEngine
    from flora_server.engine.protocol import InMemorySource

    engine = PagedLLMEngine(
        Loaded(model),
        InMemorySource(adapters),
        kv_cache_bytes=sizes.kv_cache_bytes,
        kv_block_size=16,
        max_num_batched_tokens=sizes.token_budget,
        max_batch_size=max(sizes.batches),
        max_queue=4 * max(sizes.batches),
        max_slots=sizes.adapters,
        max_new_tokens_cap=sizes.new_tokens + sizes.prefix,
        cuda_graphs=graphs,
        graph_capture=RecordedCapture() if dry and graphs == "auto" else None,
    )
    engine.start()
    deadline = time.monotonic() + 300
    while not engine.ready:
        if time.monotonic() > deadline:
            raise RuntimeError("the engine did not become ready")
        time.sleep(0.05)
    return engine
