"""Per-row constraints in `engine/sampling.sample_tokens`: masks, accepts, free rows, and
grammars that end or reach a dead end."""

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
from flora_server.engine.protocol import GrammarDeadEndError, SamplingParams
from flora_server.engine.sampling import SamplingTensors, sample_tokens
from flora_server.errors import engine_error_to_api


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
    tokens, failed = sample_tokens(logits, params, None, [None] * 3, [c0, None, c2])
    want0 = 5 if logits[0, 5] > logits[0, 66] else 66
    assert tokens.tolist() == [want0, int(free_tokens[1]), 41]
    assert c0.accepted == [want0] and c2.accepted == [41] and failed == {}
    # a sampling row draws only from its allowed set too
    params = SamplingTensors.from_params([SamplingParams(do_sample=True, seed=1)] * 3)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    for _ in range(20):
        tokens, _ = sample_tokens(logits, params, None, gens, [AllowOnly({7, 8}), None, None])
        assert int(tokens[0]) in (7, 8)


def test_a_refused_token_is_reported_for_its_row_only() -> None:
    """A matcher refusing the token its own mask allowed is a server bug: a plain error (the
    engine wraps it into a 500), never blamed on the client."""
    logits = torch.randn(2, 64)
    params = SamplingTensors.from_params([SamplingParams()] * 2)
    _, failed = sample_tokens(
        logits, params, None, [None, None], [AllowOnly({1}), AllowOnly({2}, refuse=True)]
    )
    assert list(failed) == [1]
    assert type(failed[1]) is ValueError and "refused token 2" in str(failed[1])


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
        tokens, failed = sample_tokens(logits, params, None, [None], [constraint])
        assert failed == {}
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


def _walk(constraint, char_tokenizer, text: str) -> None:
    for ch in text:
        assert constraint.accept(char_tokenizer.convert_tokens_to_ids(ch)), ch


def test_a_grammar_dead_end_fails_its_rows_alone_as_a_422_naming_the_field(
    char_tokenizer,
) -> None:
    """`ab[^\\s\\S]` allows nothing after `ab`, not even the end. The greedy and the sampled
    row that reach it are failed with the client's error (422, naming the field the grammar
    came from), without a draw from an empty distribution; the free row beside them gets
    its own token."""
    vocab = len(char_tokenizer)
    eos = char_tokenizer.eos_token_id
    compiler = GrammarCompiler(char_tokenizer, vocab, [eos])
    spec = ConstraintSpec("regex", pattern=r"ab[^\s\S]", field="parameters.grammar")
    greedy_row, sampled_row = compiler.compile(spec), compiler.compile(spec)
    constraints = [greedy_row, None, sampled_row]
    params = SamplingTensors.from_params(
        [SamplingParams(), SamplingParams(), SamplingParams(do_sample=True, seed=1)]
    )
    gens = [None, None, torch.Generator().manual_seed(1)]
    gen = torch.Generator().manual_seed(0)
    for want in "ab":
        logits = torch.randn(3, vocab, generator=gen)
        tokens, failed = sample_tokens(logits, params, None, gens, constraints)
        assert failed == {}
        assert char_tokenizer.decode([int(tokens[0])]) == want
        assert char_tokenizer.decode([int(tokens[2])]) == want
    logits = torch.randn(3, vocab, generator=gen)
    tokens, failed = sample_tokens(logits, params, None, gens, constraints)
    assert sorted(failed) == [0, 2]
    assert int(tokens[1]) == int(logits[1].argmax())
    for error in failed.values():
        assert isinstance(error, GrammarDeadEndError) and error.param == "parameters.grammar"
        assert str(error).startswith("parameters.grammar: no output can match the regular")
        api = engine_error_to_api(error)
        assert (api.status, api.param) == (422, "parameters.grammar")
    assert not greedy_row.is_terminated()  # nothing was accepted past the dead end


def test_a_grammar_that_accepted_its_stop_token_allows_only_the_stop_token(
    char_tokenizer,
) -> None:
    """A row run on past its grammar's end (an engine caller with ignore_eos) is masked to
    the stop token; xgrammar itself raises when asked for the next mask then."""
    vocab = len(char_tokenizer)
    eos = char_tokenizer.eos_token_id
    constraint = GrammarCompiler(char_tokenizer, vocab, [eos]).compile(
        ConstraintSpec("regex", pattern="ab")
    )
    _walk(constraint, char_tokenizer, "ab")
    assert constraint.accept(eos) and constraint.is_terminated()
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(2))
    logits[:, eos] = -50.0  # the model would never pick it
    params = SamplingTensors.from_params([SamplingParams(), SamplingParams(do_sample=True)])
    tokens, failed = sample_tokens(
        logits, params, None, [None, torch.Generator().manual_seed(3)], [constraint, constraint]
    )
    assert tokens.tolist() == [eos, eos] and failed == {}


def test_an_empty_tgi_json_schema_constrains_to_any_json_value(char_tokenizer) -> None:
    """`{}` accepts any JSON value (not only objects) and nothing else; TGI's `json` and
    `json_object` grammars with it are enforced, not dropped."""
    from flora_server.api.structured import from_tgi
    from flora_server.schemas.structured import TGIGrammar

    vocab = len(char_tokenizer)
    eos = char_tokenizer.eos_token_id
    compiler = GrammarCompiler(char_tokenizer, vocab, [eos])
    for kind in ("json", "json_object"):
        spec = from_tgi(TGIGrammar(type=kind, value={}))
        assert spec == ConstraintSpec("json_schema", {})
        constraint = compiler.compile(spec)
        mask = allocate_bitmask(1, vocab, "cpu")
        constraint.fill_bitmask(mask, 0)
        allowed = unpack_bitmask(mask, vocab)[0].nonzero().flatten().tolist()
        starts = {char_tokenizer.decode([t]) for t in allowed}
        assert starts == set('"-0123456789[ftn{')
        _walk(constraint, char_tokenizer, '[1, {"a": null}, "x"]')
        assert constraint.accept(eos) and constraint.is_terminated()
