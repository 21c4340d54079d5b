"""Decode, prefill, PEFT and naive hot-swap measurements (issue 6, items 1-4), side by side.

Every variant drives the same SmolLM2 weights through the engine's ``CausalBatch``:

- ``base``: the ServingModel with every row routed to no adapter (what the engine runs for
  base requests; the wrappers cost a list lookup);
- ``k1_merged``: all 32 rows on one adapter, merged into the weights (the engine's policy
  merges a homogeneous batch after a few steps);
- ``k4`` / ``k32``: 32 rows over 4 / 32 distinct adapters, per-row (batched) mode;
- ``peft_k32`` / ``peft_k4``: the same rows through HF PEFT's LoRA with ``adapter_names=``
  (a separate copy of the base, rank 8 on the same projections);
- ``naive_swap``: one request at a time (batch 1): merge its adapter, prefill, decode,
  unmerge; compared with ``flora_requests``: the same requests (32 adapters) as one batch.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bench.timing import interleave, ratio, summary
from bench.workload import (
    PROJECTIONS,
    WithKwargs,
    decode_sample,
    prompts,
    random_modules,
)
from flora.serving import ServingModel, ServingPolicy


@dataclass(frozen=True)
class DecodeConfig:
    batch: int = 32
    prompt_len: int = 16
    rounds: int = 10  # quick: about 100 s of decode on a quiet 2-core VM
    steps: int = 6  # decode steps per sample: long enough to amortise a variant switch
    peft_steps: int = 1
    request_tokens: int = 16  # tokens per request in the hot-swap comparison
    swap_rounds: int = 4
    prefill_batch: int = 8
    prefill_len: int = 512
    prefill_rounds: int = 4
    peft: bool = True


def build_serving(
    model: nn.Module, n_adapters: int, policy: ServingPolicy | None = None, rank: int = 8
) -> ServingModel:
    serving = ServingModel(model, max_slots=n_adapters, max_rank=64, policy=policy)
    for slot in range(n_adapters):
        serving.load_modules(slot, random_modules(model, seed=slot, rank=rank))
    return serving


def build_peft(base: nn.Module, n_adapters: int, rank: int = 8) -> nn.Module:
    """PEFT LoRA with ``n_adapters`` adapters (random, non-zero B) on a copy of ``base``."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=list(PROJECTIONS), init_lora_weights=False
    )
    model = get_peft_model(copy.deepcopy(base), cfg, adapter_name="a0")
    for i in range(1, n_adapters):
        model.add_adapter(f"a{i}", cfg)
    return model.eval()


def decode_suite(
    model: nn.Module,
    serving: ServingModel,
    cfg: DecodeConfig,
    peft_model: nn.Module | None,
    log: Any = print,
    narrow: tuple[nn.Module, ServingModel] | None = None,
) -> dict[str, Any]:
    """Decode ratios (K = 1 merged, 4, 32 vs base), vs PEFT, vs naive hot swap, prefill.
    ``serving`` wraps ``model`` with 32 loaded slots; ``peft_model`` from ``build_peft``;
    ``narrow``: a copy of the base with the same 32 adapters in bfloat16 factor banks
    (``ServingPolicy.factor_dtype``), measured as ``k4_bf16`` / ``k32_bf16``."""
    b = cfg.batch
    text = prompts(b, cfg.prompt_len, seed=0)

    def routed(rows: list[int | None]) -> Any:
        return lambda: serving.set_routing(rows)

    def merged() -> None:
        serving.set_routing([0] * b)
        serving.merge(0)
        serving.set_routing([0] * b)

    samples = {
        "base": decode_sample(model, text, cfg.steps, routed([None] * b)),
        "k1_merged": decode_sample(model, text, cfg.steps, merged, serving.unmerge),
        "k1_batched": decode_sample(model, text, cfg.steps, routed([0] * b)),
        "k4": decode_sample(model, text, cfg.steps, routed([i % 4 for i in range(b)])),
        "k32": decode_sample(model, text, cfg.steps, routed([i % 32 for i in range(b)])),
    }
    if narrow is not None:
        narrow_model, narrow_serving = narrow
        for k in (4, 32):
            rows = [i % k for i in range(b)]
            samples[f"k{k}_bf16"] = decode_sample(
                narrow_model, text, cfg.steps, lambda rows=rows: narrow_serving.set_routing(rows)
            )
    if peft_model is not None:
        for k in (4, 32):
            names = [f"a{i % k}" for i in range(b)]
            samples[f"peft_k{k}"] = decode_sample(
                WithKwargs(peft_model, adapter_names=names), text, cfg.peft_steps
            )
    log(f"decode: {len(samples)} variants x {cfg.rounds} rounds")
    times = interleave(samples, cfg.rounds)
    out: dict[str, Any] = {
        "decode_ratio_k1": ratio(times, "base", "k1_merged"),
        "decode_ratio_k1_batched": ratio(times, "base", "k1_batched"),
        "decode_ratio_k4": ratio(times, "base", "k4"),
        "decode_ratio_k32": ratio(times, "base", "k32"),
    }
    for k in (4, 32):
        if f"k{k}_bf16" in times:
            out[f"decode_ratio_k{k}_bf16"] = ratio(times, "base", f"k{k}_bf16")
    if peft_model is not None:
        out["vs_peft_k32"] = ratio(times, "peft_k32", "k32")
        out["vs_peft_k4"] = ratio(times, "peft_k4", "k4")
        out["peft_ratio_k32"] = ratio(times, "base", "peft_k32")
        out["peft_ratio_k4"] = ratio(times, "base", "peft_k4")
    out["decode_seconds_per_token"] = summary(times)
    swap = swap_suite(model, serving, cfg, log)
    out.update(swap)
    out.update(prefill_suite(model, serving, cfg, log))
    serving.unmerge()
    return out


def swap_suite(model: nn.Module, serving: ServingModel, cfg: DecodeConfig, log: Any) -> dict:
    """Naive hot swap (one request at a time, merge/unmerge) vs flora's batch of the same
    requests: 32 clients over 32 adapters. Seconds per generated token, whole requests
    (merge + prefill + decode + unmerge vs routing + prefill + decode)."""
    from flora_server.engine.causal_batch import CausalBatch

    n = cfg.request_tokens
    text = prompts(cfg.batch, cfg.prompt_len, seed=1)
    turn = {"i": 0}

    def generate(rows: list[list[int]]) -> None:
        batch, logits = CausalBatch.prefill(model, rows, list(rows))
        batch.next_tokens = logits.argmax(-1)
        for _ in range(n - 1):
            batch.next_tokens = batch.decode(model).argmax(-1)

    def naive() -> float:
        slot = turn["i"] % cfg.batch
        turn["i"] += 1
        start = time.perf_counter()
        with torch.inference_mode():
            serving.set_routing([slot])
            serving.merge(slot)
            serving.set_routing([slot])
            generate([text[slot]])
            serving.unmerge()
        return (time.perf_counter() - start) / n

    def flora() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            serving.set_routing(list(range(cfg.batch)))
            generate(text)
        return (time.perf_counter() - start) / (n * cfg.batch)

    log(f"hot swap: {cfg.swap_rounds} rounds, {n} tokens per request")
    times = interleave({"naive_swap": naive, "flora_requests": flora}, cfg.swap_rounds)
    return {
        "vs_naive_swap": ratio(times, "naive_swap", "flora_requests"),
        "swap_seconds_per_token": summary(times),
    }


def prefill_suite(model: nn.Module, serving: ServingModel, cfg: DecodeConfig, log: Any) -> dict:
    """Prefill of ``prefill_batch`` prompts of ``prefill_len`` tokens, K = batch distinct
    adapters vs base; seconds per prompt token."""
    from flora_server.engine.causal_batch import CausalBatch

    b = cfg.prefill_batch
    text = prompts(b, cfg.prefill_len, seed=2)

    def sample(rows: list[int | None]) -> Any:
        def run() -> float:
            serving.set_routing(rows)
            start = time.perf_counter()
            with torch.inference_mode():
                CausalBatch.prefill(model, text, list(rows))
            return (time.perf_counter() - start) / (b * cfg.prefill_len)

        return run

    log(f"prefill: {cfg.prefill_rounds} rounds, {b} x {cfg.prefill_len} tokens")
    times = interleave(
        {"base": sample([None] * b), f"k{b}": sample(list(range(b)))}, cfg.prefill_rounds
    )
    return {
        f"prefill_ratio_k{b}": ratio(times, "base", f"k{b}"),
        "prefill_seconds_per_token": summary(times),
    }
