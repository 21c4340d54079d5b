"""The benchmark workload: SmolLM2-135M, rank-8 adapters on the 7 llama projections,
synthetic prompts, and the engine's own batch object (``CausalBatch``) for every decode."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from flora.serving import ModuleFactors

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load_base(name: str = "smollm2-135m-instruct") -> nn.Module:
    """The embedded model, float32, eval mode (the CPU server's configuration)."""
    from flora.models import load

    return load(name).model.eval()


def target_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in PROJECTIONS]


def random_modules(
    model: nn.Module, seed: int, rank: int = 8, names: Sequence[str] | None = None
) -> dict[str, ModuleFactors]:
    """A random rank-``rank`` FLoRA adapter (core and factors) on ``names``: the numbers do
    not matter for speed, only the shapes; a non-zero core keeps the update non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in names if names is not None else target_names(model):
        w = model.get_submodule(name).weight  # (out, in)
        u_out = torch.randn(w.shape[0], rank, generator=gen) * 0.02
        u_in = torch.randn(w.shape[1], rank, generator=gen) * 0.02
        core = torch.randn(rank, rank, generator=gen)
        out[name] = ModuleFactors("linear", core, (u_out, u_in), 1.0)
    return out


def adapter_params(modules: dict[str, ModuleFactors]) -> int:
    return sum(u.numel() for mf in modules.values() for u in mf.factors)


def prompts(batch: int, length: int, seed: int, vocab: int = 49152) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, min(vocab, 20000), (batch, length), generator=gen).tolist()


class WithKwargs(nn.Module):
    """Calls ``inner`` with extra keyword arguments (PEFT's ``adapter_names=``), so the
    engine's ``CausalBatch`` can drive a PEFT model unchanged."""

    def __init__(self, inner: nn.Module, **extra: Any) -> None:
        super().__init__()
        self.inner = inner
        self.extra = extra

    def forward(self, **kwargs: Any) -> Any:
        return self.inner(**kwargs, **self.extra)


def decode_sample(
    model: nn.Module,
    batch_prompts: list[list[int]],
    steps: int,
    before: Callable[[], None] = lambda: None,
    after: Callable[[], None] = lambda: None,
) -> Callable[[], float]:
    """A timing sample: ``steps`` engine decode steps (``CausalBatch.decode`` + greedy
    selection) of one long-lived batch; returns seconds per generated token.

    The batch is prefilled once and keeps growing by ``steps`` positions per sample, so
    variants sampled the same number of times see the same KV lengths. ``before`` and
    ``after`` (untimed) set the routing / merge the variant needs.
    """
    from flora_server.engine.causal_batch import CausalBatch

    state: dict[str, Any] = {}

    def run() -> float:
        import time

        before()
        with torch.inference_mode():
            if "batch" not in state:
                batch, logits = CausalBatch.prefill(model, batch_prompts, list(batch_prompts))
                batch.next_tokens = logits.argmax(-1)
                state["batch"] = batch
            batch = state["batch"]
            start = time.perf_counter()
            for _ in range(steps):
                batch.next_tokens = batch.decode(model).argmax(-1)
            elapsed = time.perf_counter() - start
        after()
        return elapsed / (steps * len(batch_prompts))

    return run
