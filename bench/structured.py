"""Per-token cost of structured output (response_format) on SmolLM2-135M-Instruct, CPU.

1. Grammar engines side by side on the model's tokenizer (49,152 tokens) and one small JSON
   schema: compile time, and the time per token of "fill the next-token mask, apply it to
   the logits, accept the token" while walking a fixed valid answer (xgrammar, and
   llguidance / outlines-core when installed).
2. Inside the engine: `engine/sampling.sample_tokens` for a batch of B rows with every row
   constrained vs none (the masks, their application and the accepts), next to the time of
   one real batched decode step of the model at the same B, so the overhead is a ratio
   measured in one run.

    python -m bench.structured [--batch 16] [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}
ANSWER = {"name": "Alice", "age": 31, "ok": True}


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def grammar_engines(tok: Any, vocab: int, repeats: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    logits = torch.randn(1, vocab)
    import xgrammar as xgr

    start = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    grammar = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    compile_s = time.perf_counter() - start
    ids = tok.encode(json.dumps(ANSWER), add_special_tokens=False)
    bitmask = xgr.allocate_token_bitmask(1, vocab)

    def walk_xgr() -> None:
        m = xgr.GrammarMatcher(grammar)
        for t in ids:
            m.fill_next_token_bitmask(bitmask, 0)
            xgr.apply_token_bitmask_inplace(logits, bitmask)
            assert m.accept_token(t)

    walk_xgr()
    out["xgrammar"] = {
        "tokenizer_setup_ms": setup * 1000,
        "compile_ms": compile_s * 1000,
        "per_token_ms": _median_ms(walk_xgr, repeats) / len(ids),
    }
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch
    except ImportError:
        return out
    start = time.perf_counter()
    ltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    setup = time.perf_counter() - start
    grm = llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(SCHEMA), defaults={"whitespace_flexible": False}
    )
    compact = tok.encode(json.dumps(ANSWER, separators=(",", ":")), add_special_tokens=False)
    lmask = llguidance.torch.allocate_token_bitmask(1, ltok.vocab_size)

    def walk_llg() -> None:
        m = llguidance.LLMatcher(ltok, grm)
        for t in compact:
            llguidance.torch.fill_next_token_bitmask(m, lmask, 0)
            llguidance.torch.apply_token_bitmask_inplace(logits, lmask)
            assert m.consume_token(t)

    start = time.perf_counter()
    walk_llg()  # the first walk builds the lexer: the grammar's compile cost
    first = time.perf_counter() - start
    out["llguidance"] = {
        "tokenizer_setup_ms": setup * 1000,
        "compile_ms": first * 1000,
        "per_token_ms": _median_ms(walk_llg, repeats) / len(compact),
    }
    return out


def in_engine(loaded: Any, batch: int, repeats: int) -> dict[str, float]:
    """Medians of three things measured in turn in one loop (so load changes hit all
    three alike): one batched decode step of the model, `sample_tokens` with no row
    constrained, and what constraining every row adds to it (the same call with every
    row's grammar: each row's mask filled, unpacked and applied, and its token accepted)."""
    from flora_server.engine.constraints import ConstraintSpec, GrammarCompiler
    from flora_server.engine.llm_engine import eos_token_ids
    from flora_server.engine.protocol import SamplingParams
    from flora_server.engine.sampling import SamplingTensors, sample_tokens

    model, tok = loaded.model, loaded.preprocessor
    vocab = model.get_output_embeddings().weight.shape[0]
    compiler = GrammarCompiler(tok, vocab, eos_token_ids(model, tok))
    spec = ConstraintSpec("json_schema", SCHEMA)
    params = SamplingTensors.from_params([SamplingParams()] * batch)
    logits = torch.randn(batch, vocab)
    gens = [None] * batch
    matchers = [compiler.compile(spec) for _ in range(batch)]
    ids = torch.randint(0, vocab, (batch, 64))
    cache = model(ids, use_cache=True).past_key_values
    step_in = torch.randint(0, vocab, (batch, 1))
    steps, frees, masks = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        model(step_in, past_key_values=cache, use_cache=True)  # the cache grows by one
        steps.append(time.perf_counter() - start)
        start = time.perf_counter()
        sample_tokens(logits, params, None, gens)
        frees.append(time.perf_counter() - start)
        for m in matchers:  # back to the start of the answer: the widest mask
            m.reset()
        start = time.perf_counter()
        _, failed = sample_tokens(logits, params, None, gens, matchers)
        masks.append(time.perf_counter() - start - frees[-1])
        assert not failed, failed
    step_ms, free_ms, mask_ms = (statistics.median(x) * 1000 for x in (steps, frees, masks))
    return {
        "batch": batch,
        "decode_step_ms": step_ms,
        "sample_free_ms": free_ms,
        "constrain_all_rows_ms": mask_ms,
        "constrain_per_row_token_ms": mask_ms / batch,
        "constrain_vs_step": mask_ms / step_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    from flora.models import load

    loaded = load("smollm2-135m-instruct")
    vocab = loaded.model.get_output_embeddings().weight.shape[0]
    result = {
        "engines": grammar_engines(loaded.preprocessor, vocab, args.repeats),
        "in_engine": in_engine(loaded, args.batch, args.repeats),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
