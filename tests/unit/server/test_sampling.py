"""Sampling processors against transformers' logits processors (an independent
implementation), per-row parameters, seeded reproducibility, and stop-sequence hold-back."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from flora_server.engine.constraints import set_only
from flora_server.engine.protocol import GrammarDeadEndError, SamplingParams
from flora_server.engine.sampling import (
    SamplingTensors,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    make_generator,
    process_logits,
    sample_tokens,
    sampling_probs,
    seen_mask,
    select_tokens,
)
from flora_server.engine.text import TextStream, find_stop, partial_stop_len


@pytest.fixture
def logits() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(4, 50) * 3


def test_repetition_penalty_matches_transformers(logits) -> None:
    history = torch.tensor([[1, 2, 3, 3], [7, 7, 8, 9], [0, 49, 10, 11], [5, 6, 5, 6]])
    for penalty in (1.3, 0.7):
        ref = RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
        seen = seen_mask(history.tolist(), 50, "cpu")
        got = apply_repetition_penalty(logits, seen, torch.full((4,), penalty))
        torch.testing.assert_close(got, ref)


def test_per_row_penalty_leaves_neutral_rows_alone(logits) -> None:
    seen = seen_mask([[1, 2], [1, 2], [], [3]], 50, "cpu")
    got = apply_repetition_penalty(logits, seen, torch.tensor([1.0, 2.0, 2.0, 1.0]))
    assert torch.equal(got[0], logits[0]) and torch.equal(got[3], logits[3])
    assert torch.equal(got[2], logits[2])  # nothing seen
    assert not torch.equal(got[1], logits[1])


@pytest.mark.parametrize("k", [1, 5, 49, 50])
def test_top_k_matches_transformers(logits, k) -> None:
    ref = TopKLogitsWarper(k)(None, logits.clone())
    got = apply_top_k(logits, torch.full((4,), k))
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    assert torch.equal(got[~torch.isinf(got)], logits[~torch.isinf(got)])


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_matches_transformers(logits, p) -> None:
    ref = TopPLogitsWarper(p)(None, logits.clone())
    got = apply_top_p(logits, torch.full((4,), p))
    assert torch.equal(torch.isinf(got), torch.isinf(ref))


def test_per_row_top_k_and_top_p(logits) -> None:
    got = apply_top_k(logits, torch.tensor([0, 3, 50, 1]))
    kept = (~torch.isinf(got)).sum(-1).tolist()
    assert kept == [50, 3, 50, 1]
    got = apply_top_p(logits, torch.tensor([1.0, 0.5, 1e-6, 1.0]))
    ref_half = TopPLogitsWarper(0.5)(None, logits[1:2].clone())
    assert torch.equal(torch.isinf(got[1:2]), torch.isinf(ref_half))
    assert (~torch.isinf(got[2])).sum() == 1 and int(got[2].argmax()) == int(logits[2].argmax())
    assert not torch.isinf(got[0]).any()


def test_process_logits_sampling_row_matches_transformers_chain(logits) -> None:
    params = [
        SamplingParams(do_sample=True, temperature=0.7, top_k=10, top_p=0.8, min_p=0.2),
        SamplingParams(min_p=0.5),  # greedy: processors off
    ]
    tensors = SamplingTensors.from_params(params)
    got = process_logits(logits[:2], tensors, None)
    ref = logits[:1].clone()
    warpers = (
        TemperatureLogitsWarper(0.7),
        TopKLogitsWarper(10),
        TopPLogitsWarper(0.8),
        MinPLogitsWarper(0.2),
    )
    for warper in warpers:
        ref = warper(None, ref)
    torch.testing.assert_close(got[:1], ref)
    assert torch.equal(got[1], logits[1])


@pytest.mark.parametrize("min_p", [0.05, 0.3, 0.9, 1.0])
def test_min_p_matches_transformers_per_row(logits, min_p) -> None:
    """Each sampling row keeps the tokens transformers' MinPLogitsWarper keeps for its own
    min_p; a row with min_p 0 is unchanged."""
    params = [SamplingParams(do_sample=True, min_p=min_p), SamplingParams(do_sample=True)]
    got = process_logits(logits[:2], SamplingTensors.from_params(params), None)
    want = MinPLogitsWarper(min_p)(None, logits[:1].clone())
    torch.testing.assert_close(got[:1], want)
    assert torch.equal(got[1], logits[1])
    assert (got[0] > float("-inf")).sum() < logits.shape[-1]  # it dropped something


def test_greedy_is_argmax_and_seeded_sampling_reproduces(logits) -> None:
    do_sample = torch.tensor([False, True, True, False])

    def draw(seed_a: int, seed_b: int) -> list[int]:
        gens = [None, make_generator(seed_a, "cpu"), make_generator(seed_b, "cpu"), None]
        return [select_tokens(logits, do_sample, gens).tolist() for _ in range(5)]

    first = draw(11, 12)
    assert first == draw(11, 12)
    assert first != draw(13, 12)
    assert all(row[0] == int(logits[0].argmax()) for row in first)
    # A row's draws depend only on its own seed, not on the other sampling row's.
    assert [r[1] for r in draw(11, 99)] == [r[1] for r in first]


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    gen = make_generator(0, "cpu")
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[select_tokens(logits, torch.tensor([True]), [gen])[0]] += 1
    torch.testing.assert_close(counts / 3000, torch.tensor([0.7, 0.2, 0.1]), atol=0.03, rtol=0)


def test_stop_helpers() -> None:
    assert find_stop("hello world", ["wor", "lo"]) == 3
    assert find_stop("hello", ["x"]) == -1
    assert partial_stop_len("abc<e", ["<end>"]) == 2
    assert partial_stop_len("abc", ["<end>"]) == 0
    assert partial_stop_len("ab<end", ["<end>", "d"]) == 4


def chars(ids: list[int]) -> str:
    return "".join(chr(i) for i in ids)


def test_text_stream_holds_back_possible_stop() -> None:
    stream = TextStream(decode=chars, stops=("END",))
    pieces = [stream.push(ord(c)) for c in "abEx"]
    assert pieces == ["a", "b", "", "Ex"]
    pieces = [stream.push(ord(c)) for c in "yEN"]
    assert pieces == ["y", "", ""]
    assert stream.push(ord("D")) == "" and stream.stopped
    assert stream.released == "abExy"


def test_text_stream_stop_inside_one_token_and_final_flush() -> None:
    stream = TextStream(
        decode=lambda ids: "".join(["hi", " there<s", "top>more"][i] for i in ids),
        stops=("<stop>",),
    )
    assert stream.push(0) == "hi"
    assert stream.push(1) == " there"
    assert stream.push(2) == "" and stream.stopped
    assert stream.released == "hi there"
    stream = TextStream(decode=chars, stops=("xyz",))
    assert stream.push(ord("a")) == "a"
    assert stream.push(ord("x")) == ""
    assert stream.push(None, final=True) == "x"
    assert stream.released == "ax" and not stream.stopped


def test_text_stream_holds_incomplete_utf8() -> None:
    data = "é!".encode()
    stream = TextStream(decode=lambda ids: bytes(ids).decode("utf-8", errors="replace"))
    assert stream.push(data[0]) == ""
    assert stream.push(data[1]) == "é"
    assert stream.push(data[2]) == "!"


@pytest.mark.parametrize(
    "params",
    [
        [SamplingParams(), SamplingParams(top_k=5, top_p=0.5, temperature=0.3)],  # greedy
        [SamplingParams(), SamplingParams(do_sample=True, temperature=0.5)],
        [SamplingParams(top_k=3), SamplingParams(do_sample=True, top_k=7)],
        [SamplingParams(do_sample=True, top_p=0.6), SamplingParams(top_p=0.1)],
        [SamplingParams(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)],
    ],
)
def test_processors_no_row_switches_on_are_skipped_without_changing_a_value(logits, params) -> None:
    """The host flags skip a processor only where it is the identity for every row: the
    result equals running all of them."""
    tensors = SamplingTensors.from_params(params)
    every = SamplingTensors.from_params(params)
    every.temperature_on = every.top_k_on = every.top_p_on = True
    rows = logits[: len(params)]
    assert torch.equal(process_logits(rows, tensors, None), process_logits(rows, every, None))
    sampled = [p for p in params if p.do_sample]
    assert tensors.sampling == bool(sampled)
    assert tensors.top_k_on == any(p.top_k for p in sampled)
    assert tensors.top_p_on == any(p.top_p is not None and p.top_p < 1 for p in sampled)
    assert tensors.temperature_on == any(p.temperature != 1.0 for p in sampled)


def test_a_greedy_batch_copies_no_parameter_to_the_device() -> None:
    """An all-greedy batch without penalties is an argmax: none of the per-row tensors is
    built (each would be a host-to-device copy per step); a sampling row builds them."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    greedy = SamplingTensors.from_params([SamplingParams()] * 3)
    tokens, _ = sample_tokens(logits, greedy, None, [None] * 3)
    assert tokens.tolist() == logits.argmax(-1).tolist()
    built = {"do_sample", "temperature", "top_k", "top_p", "repetition_penalty"}
    assert not built & set(vars(greedy))
    mixed = SamplingTensors.from_params([SamplingParams(), SamplingParams(do_sample=True, seed=3)])
    sample_tokens(logits[:2], mixed, None, [None, torch.Generator().manual_seed(3)])
    assert "do_sample" in vars(mixed)


def test_sampling_draws_by_the_limit_of_logits_that_are_not_finite() -> None:
    """+inf logits share the mass, NaN logits are never drawn, and a row with nothing to
    draw keeps its argmax: `torch.multinomial` would raise on all three."""
    inf, nan = float("inf"), float("nan")
    logits = torch.zeros(3, 10)
    logits[0, 2] = logits[0, 7] = inf
    logits[1, :5] = nan  # the rest 0: uniform over tokens 5 to 9
    logits[2] = -inf
    probs, drawable = sampling_probs(logits)
    assert drawable.tolist() == [True, True, False]
    assert probs[0].tolist() == [0, 0, 0.5, 0, 0, 0, 0, 0.5, 0, 0]
    torch.testing.assert_close(probs[1], torch.tensor([0.0] * 5 + [0.2] * 5))
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    drawn: list[set[int]] = [set(), set(), set()]
    for _ in range(40):
        tokens = select_tokens(logits, torch.tensor([True] * 3), gens)
        for row, token in enumerate(tokens.tolist()):
            drawn[row].add(token)
    assert drawn == [{2, 7}, {5, 6, 7, 8, 9}, {0}]


def test_a_penalty_that_zeroes_in_float32_never_crashes_sampling() -> None:
    """A penalty the schemas refuse (below 0.01) but an engine caller could pass: 1e-300 is
    0 in float32, so seen positive logits become +inf and the rest NaN or -0. The sampled
    row draws among the +inf ones (the limit), the greedy row takes one of them."""
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0, 3.0]] * 2)
    seen = seen_mask([[0, 1, 2, 3], [0, 1, 2, 3]], 5, "cpu")
    params = [SamplingParams(repetition_penalty=1e-300, do_sample=True, seed=1)] * 2
    params[1] = SamplingParams(repetition_penalty=1e-300)
    tensors = SamplingTensors.from_params(params)
    gens = [torch.Generator().manual_seed(1), None]
    drawn = set()
    for _ in range(30):
        tokens, failed = sample_tokens(logits, tensors, seen, gens)
        assert failed == {}
        drawn.add(int(tokens[0]))
        assert int(tokens[1]) in (0, 2)
    assert drawn == {0, 2}


class OnlyThese:
    """A grammar in miniature: allows exactly `tokens` at every step."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        set_only(bitmask, row, self.tokens)

    def accept(self, token: int) -> bool:
        return token in self.tokens

    def is_terminated(self) -> bool:
        return False


def test_held_ends_are_never_picked_unless_the_grammar_allows_nothing_else() -> None:
    """min_tokens' mask: a held token is not chosen even where it is the argmax, or the only
    token a sampling row could draw; a row whose grammar allows only held tokens (it can
    only end) still ends; rows without held tokens are unchanged."""
    logits = torch.full((4, 40), -5.0)
    logits[:, 7] = 9.0  # the argmax of every row, held in rows 0, 1 and 2
    logits[:, 3] = 4.0
    logits[1, :] = float("-inf")
    logits[1, 7] = logits[1, 11] = 0.0  # sampling row 1 can draw 7 or 11
    held = torch.zeros(4, 40, dtype=torch.bool)
    held[0:3, 7] = True
    params = [SamplingParams(), SamplingParams(do_sample=True, seed=3)] + [SamplingParams()] * 2
    gens = [None, torch.Generator().manual_seed(3), None, None]
    constraints = [None, None, OnlyThese([7]), OnlyThese([7, 3])]
    for _ in range(10):
        tokens, failed = sample_tokens(
            logits, SamplingTensors.from_params(params), None, gens, constraints, held
        )
        assert failed == {} and tokens.tolist() == [3, 11, 7, 7]


def test_allowed_token_ids_restrict_rows_and_a_grammar_outside_them_is_a_dead_end() -> None:
    """`only`: a row picks among its allowed tokens even where another is the argmax; a row
    without a list is unchanged; a grammar whose tokens are all outside the list is the
    client's 422 (GrammarDeadEndError naming the grammar's field), not a matcher error."""
    logits = torch.full((3, 40), -5.0)
    logits[:, 7] = 9.0
    logits[:, 12] = 3.0
    logits[:, 30] = 1.0
    only = torch.ones(3, 40, dtype=torch.bool)
    only[0] = False
    only[0, [12, 30]] = True
    only[2] = False
    only[2, 30] = True
    constraints = [None, None, OnlyThese([7, 12])]
    params = SamplingTensors.from_params([SamplingParams()] * 3)
    tokens, failed = sample_tokens(logits, params, None, [None] * 3, constraints, None, only)
    assert tokens[:2].tolist() == [12, 7]
    assert list(failed) == [2] and isinstance(failed[2], GrammarDeadEndError)
    assert "among allowed_token_ids" in str(failed[2])
