"""Per-row constraints in `engine/sampling.sample_tokens`: masks, accepts, free rows."""

from __future__ import annotations

import json

import pytest
import torch

from flora_server.engine.constraints import (
    ConstraintError,
    ConstraintSpec,
    GrammarCompiler,
    allocate_bitmask,
    unpack_bitmask,
)
from flora_server.engine.protocol import SamplingParams
from flora_server.engine.sampling import SamplingTensors, sample_tokens


class AllowOnly:
    """A constraint that allows a fixed set of tokens and records what it accepted."""

    def __init__(self, allowed: set[int], refuse: bool = False) -> None:
        self.allowed = allowed
        self.accepted: list[int] = []
        self.refuse = refuse

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        vocab = bitmask.shape[1] * 32
        packed = torch.zeros(vocab, dtype=torch.int64)
        packed[list(self.allowed)] = 1
        words = (packed.reshape(-1, 32) << torch.arange(32)).sum(1)
        bitmask[row] = words.to(torch.int64).where(words < 2**31, words - 2**32).to(torch.int32)

    def accept(self, token: int) -> bool:
        self.accepted.append(token)
        return not self.refuse

    def is_terminated(self) -> bool:
        return False


def test_unpack_bitmask_reads_bit_t_mod_32_of_word_t_div_32() -> None:
    mask = allocate_bitmask(2, 40, "cpu")
    mask[0] = 0
    mask[0, 0] = 1 << 3
    mask[0, 1] = 1 << 5  # token 37
    got = unpack_bitmask(mask, 40)
    assert got.shape == (2, 40)
    assert got[0].nonzero().flatten().tolist() == [3, 37]
    assert bool(got[1].all())  # -1: every token allowed


def test_constrained_rows_pick_allowed_tokens_and_free_rows_are_unchanged() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 70)
    params = SamplingTensors.from_params([SamplingParams()] * 3)
    free_tokens, _ = sample_tokens(logits, params, None, [None] * 3)
    c0, c2 = AllowOnly({5, 66}), AllowOnly({41})
    tokens, refused = sample_tokens(logits, params, None, [None] * 3, [c0, None, c2])
    want0 = 5 if logits[0, 5] > logits[0, 66] else 66
    assert tokens.tolist() == [want0, int(free_tokens[1]), 41]
    assert c0.accepted == [want0] and c2.accepted == [41] and refused == []
    # a sampling row draws only from its allowed set too
    params = SamplingTensors.from_params([SamplingParams(do_sample=True, seed=1)] * 3)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    for _ in range(20):
        tokens, _ = sample_tokens(logits, params, None, gens, [AllowOnly({7, 8}), None, None])
        assert int(tokens[0]) in (7, 8)


def test_a_refused_token_is_reported_for_its_row_only() -> None:
    logits = torch.randn(2, 64)
    params = SamplingTensors.from_params([SamplingParams()] * 2)
    _, refused = sample_tokens(
        logits, params, None, [None, None], [AllowOnly({1}), AllowOnly({2}, refuse=True)]
    )
    assert refused == [1]


def test_xgrammar_walk_on_a_char_tokenizer_yields_schema_json(char_tokenizer) -> None:
    """Greedy over random logits, masked by the compiled schema, ends in valid JSON."""
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "c": {"enum": ["ab", "ba"]}},
        "required": ["ok", "c"],
        "additionalProperties": False,
    }
    vocab = len(char_tokenizer)
    eos = char_tokenizer.eos_token_id
    compiler = GrammarCompiler(char_tokenizer, vocab, [eos])
    constraint = compiler.compile(ConstraintSpec("json_schema", schema))
    params = SamplingTensors.from_params([SamplingParams()])
    gen = torch.Generator().manual_seed(0)
    out: list[int] = []
    for _ in range(60):
        logits = torch.randn(1, vocab, generator=gen)
        tokens, refused = sample_tokens(logits, params, None, [None], [constraint])
        assert refused == []
        if int(tokens[0]) == eos:
            break
        out.append(int(tokens[0]))
    assert constraint.is_terminated()
    jsonschema.validate(json.loads(char_tokenizer.decode(out)), schema)


def test_a_schema_xgrammar_cannot_compile_is_a_constraint_error(char_tokenizer) -> None:
    compiler = GrammarCompiler(char_tokenizer, len(char_tokenizer), [0])
    with pytest.raises(ConstraintError, match="JSON schema"):
        compiler.compile(ConstraintSpec("json_schema", {"type": "no-such-type"}))


def test_regex_grammar_walk_on_a_char_tokenizer(char_tokenizer) -> None:
    import re

    vocab = len(char_tokenizer)
    eos = char_tokenizer.eos_token_id
    constraint = GrammarCompiler(char_tokenizer, vocab, [eos]).compile(
        ConstraintSpec("regex", pattern="(ab|ba)c{2,3}")
    )
    params = SamplingTensors.from_params([SamplingParams()])
    gen = torch.Generator().manual_seed(1)
    out: list[int] = []
    for _ in range(10):
        tokens, _ = sample_tokens(
            torch.randn(1, vocab, generator=gen), params, None, [None], [constraint]
        )
        if int(tokens[0]) == eos:
            break
        out.append(int(tokens[0]))
    assert re.fullmatch("(ab|ba)c{2,3}", char_tokenizer.decode(out))
