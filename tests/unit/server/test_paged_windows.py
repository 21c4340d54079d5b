"""Sliding-window attention in engine v2 (`paged/windows.py`, `paged/runner.py`,
`paged/graphs.py`) on tiny random float32 decoders built in-process: Mistral (every layer
slides), Qwen2 with `max_window_layers` (layer 0 full, layer 1 sliding) and Gemma3 text
(layer 0 sliding, layer 1 full), window 8, blocks of 4.

References are transformers' own eager attention, which applies the window through its
mask (`masking_utils.sliding_window_causal_mask_function`): a packed step's logits equal a
full forward within 1e-5, and engine v2's greedy tokens (chunked prefill at budgets below
and above the window, decode past it, several sequences packed) equal `generate`. The same
prompts under full attention give other tokens, so these tests fail when the window is
ignored."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch
from test_engine import greedy, run
from test_paged_engine import make_engine, settled_stats
from test_paged_graphs import DEVICES, Pair
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GptOssConfig,
    GptOssForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from flora_server.engine.paged.runner import ChunkInput, KVTensors, PagedRunner
from flora_server.engine.paged.windows import attention_windows
from flora_server.engine.protocol import FinishEvent, GenerationRequest

pytestmark = pytest.mark.timeout(300)
W = 8  # the window of the sliding layers
KINDS = ["mistral", "qwen2", "gemma3"]
WINDOWS = {"mistral": (W, W), "qwen2": (None, W), "gemma3": (W, None)}
DIMS = {
    "vocab_size": 98,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
    "tie_word_embeddings": False,
}


def config_of(kind: str, window: int | None) -> object:
    """The config of a tiny `kind` model sliding by `window` (None: every layer full)."""
    if kind == "mistral":
        return MistralConfig(sliding_window=window, **DIMS)
    if kind == "qwen2":
        return Qwen2Config(
            use_sliding_window=window is not None,
            sliding_window=window,
            max_window_layers=1,
            **DIMS,
        )
    sliding = "sliding_attention" if window is not None else "full_attention"
    return Gemma3TextConfig(
        sliding_window=window or W,
        layer_types=[sliding, "full_attention"],
        query_pre_attn_scalar=16,
        **DIMS,
    )


def tiny(kind: str, window: int | None = W) -> torch.nn.Module:
    """Eval-mode float32 model with eager attention; the same weights for every window (as
    `tiny_engine.make_tiny_llama`, the logits spread so greedy picks are no near-ties)."""
    cls = {"mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM, "gemma3": Gemma3ForCausalLM}
    config = config_of(kind, window)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls[kind](config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
        model.lm_head.weight[1].fill_(0.0)
    return model


def tokens(seed: int, n: int) -> list[int]:
    return torch.randint(3, 98, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def generate(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    """transformers' greedy `generate` (its own cache and sliding-window masks)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=steps,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


SHARED = tokens(100, 12)  # 3 blocks, longer than the window: a prefix hit starts past it
PROMPTS = {"long": SHARED + tokens(1, 9), "hit": SHARED + tokens(2, 3), "short": tokens(3, 5)}
STEPS = 16  # every sequence decodes past the window


# -- the rule ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_windows_are_read_per_layer_as_transformers_masks_read_them(kind) -> None:
    assert attention_windows(tiny(kind)) == WINDOWS[kind]
    assert attention_windows(tiny(kind, window=None)) == (None, None)


def _with_config(**config) -> torch.nn.Module:
    module = torch.nn.Module()
    module.config = SimpleNamespace(num_hidden_layers=2, **config)
    return module


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (
            lambda: _with_config(layer_types=["full_attention", "linear_attention"]),
            r"full and sliding attention layers only, not \['linear_attention'\]",
        ),
        (
            lambda: _with_config(layer_types=["chunked_attention"] * 2),
            r"not \['chunked_attention'\]",
        ),
        (lambda: _with_config(attention_chunk_size=64), "chunked attention"),
        (lambda: _with_config(logit_scale=0.0625), r"scaled final logits.*logit_scale"),
        (lambda: _with_config(logits_scaling=8.0), r"scaled final logits.*logits_scaling"),
        (
            lambda: _with_config(layer_types=["sliding_attention"] * 2, sliding_window=None),
            "sliding_attention layers without a sliding_window",
        ),
        (
            lambda: _with_config(layer_types=["full_attention"] * 3),
            "3 layer_types for 2 layers",
        ),
        (
            lambda: Gemma2ForCausalLM(Gemma2Config(**DIMS)),
            "attention logit soft-capping",
        ),
        (
            lambda: Gemma3ForCausalLM(
                Gemma3TextConfig(final_logit_softcapping=30.0, sliding_window=W, **DIMS)
            ),
            "final logit soft-capping",
        ),
        (
            lambda: Gemma3ForCausalLM(
                Gemma3TextConfig(use_bidirectional_attention=True, sliding_window=W, **DIMS)
            ),
            "causal attention only",
        ),
        (
            lambda: GptOssForCausalLM(
                GptOssConfig(num_local_experts=2, num_experts_per_tok=1, sliding_window=W, **DIMS)
            ),
            r"attention sinks \(model.layers.0.self_attn.sinks\)",
        ),
    ],
)
def test_what_the_paged_attention_cannot_reproduce_is_refused(model, reason) -> None:
    with pytest.raises(ValueError, match=reason):
        attention_windows(model())


def test_an_attention_module_disagreeing_with_the_config_is_refused() -> None:
    model = tiny("qwen2")
    model.model.layers[0].self_attn.sliding_window = 4
    with pytest.raises(ValueError, match=r"layers.0.self_attn slides by 4, the config by None"):
        attention_windows(model)


# -- the paged attention against transformers --------------------------------------------------


def two_packed_steps(runner: PagedRunner, seqs: dict[str, list[int]]) -> torch.Tensor:
    """Step 1 prefills the first `cut` tokens of each sequence; step 2 packs, beside each
    other, a chunk at position 0 longer than the window, chunks starting past the window
    and before it, and decode tokens with contexts past and within the window. Returns step
    2's logits of every packed token."""

    def no_routing(slots):
        return None

    cuts = {"a": (0, 12), "b": (5, 14), "c": (19, 20), "d": (5, 6), "e": (12, 20)}
    blocks = {name: list(range(8 * i, 8 * i + 8)) for i, name in enumerate(seqs)}
    first = [ChunkInput(seqs[n][:start], 0, blocks[n]) for n, (start, _) in cuts.items() if start]
    runner.run(first, [None] * sum(len(c.token_ids) for c in first), [0], no_routing)
    second = [ChunkInput(seqs[n][s:e], s, blocks[n]) for n, (s, e) in cuts.items()]
    packed = sum(len(c.token_ids) for c in second)
    return runner.run(second, [None] * packed, list(range(packed)), no_routing)


@pytest.mark.parametrize("kind", KINDS)
def test_a_packed_steps_logits_equal_transformers_within_1e_5(kind) -> None:
    seqs = {name: tokens(10 + i, 20) for i, name in enumerate("abcde")}
    cuts = {"a": (0, 12), "b": (5, 14), "c": (19, 20), "d": (5, 6), "e": (12, 20)}
    ref = tiny(kind)
    with torch.no_grad():
        want = torch.cat(
            [ref(torch.tensor([seqs[n]])).logits[0, s:e] for n, (s, e) in cuts.items()]
        )
    kv = KVTensors(2, 40, 4, 2, 16, torch.float32, "cpu")
    got = two_packed_steps(PagedRunner(tiny(kind), kv), seqs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # The same steps with the window ignored are far off: the comparison above sees it.
    blind = PagedRunner(tiny(kind), KVTensors(2, 40, 4, 2, 16, torch.float32, "cpu"))
    blind.windows = (None, None)
    assert (two_packed_steps(blind, seqs) - want).abs().max() > 0.1


# -- engine v2 end to end ---------------------------------------------------------------------


def test_full_attention_gives_other_tokens_for_these_prompts() -> None:
    """What makes the engine tests below sensitive to the window."""
    for kind in KINDS:
        sliding, full = tiny(kind), tiny(kind, window=None)
        assert generate(sliding, PROMPTS["long"], STEPS) != generate(full, PROMPTS["long"], STEPS)
        assert generate(sliding, PROMPTS["short"], STEPS) != generate(
            full, PROMPTS["short"], STEPS
        ), kind


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("budget", [4, 16])  # prefill chunks shorter / longer than W
def test_engine_v2_greedy_equals_transformers_generate(kind, budget) -> None:
    engine = make_engine({}, model=tiny(kind), max_num_batched_tokens=budget)

    async def together():
        first_token = asyncio.Event()

        async def one(name):
            if name == "hit":  # joins once "long" has cached the shared blocks
                await first_token.wait()
            request = GenerationRequest(name, PROMPTS[name], greedy(STEPS), None)
            events = []
            async for event in engine.generate(request):
                events.append(event)
                if name == "long":
                    first_token.set()
            return name, events

        return dict(await asyncio.gather(*(one(name) for name in PROMPTS)))

    try:
        results = run(together())
        stats = settled_stats(engine)
    finally:
        run(engine.shutdown(5))
    # "hit" reused the 12 shared tokens: its first chunk started past the window.
    assert stats.prefix_cache_hits >= len(SHARED)
    ref = tiny(kind)
    for name, events in results.items():
        assert isinstance(events[-1], FinishEvent)
        assert list(events[-1].token_ids) == generate(ref, PROMPTS[name], STEPS), (kind, name)


# -- CUDA-graph decode -------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["qwen2", "gemma3"])
def test_graph_decode_matches_eager_past_the_window(adapters, kind, device) -> None:
    """Recorded decode (`RecordedCapture` on the CPU, `torch.cuda.CUDAGraph` on CUDA) of a
    hybrid model equals the eager runner step by step, spans within and past the window,
    adapters on some rows; the base row's tokens equal transformers' greedy tokens."""
    pair = Pair(adapters, model=tiny(kind), device=device)
    prompts = {"a": tokens(20, 10), "b": tokens(21, 3), "c": tokens(22, 12)}
    pair.add("a", prompts["a"], 0)
    pair.add("b", prompts["b"], None)
    pair.add("c", prompts["c"], 1)
    pair.decode(["b"])  # 1 block: a span of 4 <= W, no trimming
    for _ in range(STEPS - 4):
        pair.decode(["a", "b", "c"])  # bucket 4, spans of 16 and 32 > W
    assert {(k[0], k[1]) for k in pair.graphed.graphs} >= {(1, 1), (4, 4), (4, 8)}
    pair.used_kv_equal()
    generated = pair.seqs["b"][0][len(prompts["b"]) :]
    assert generated == generate(tiny(kind), prompts["b"], len(generated))
