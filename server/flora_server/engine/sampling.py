"""Per-row logit processing and token selection: small pure functions over batched tensors.

Every function takes the logits of the last position of each row, `logits: [B, V]`, and
per-row parameters as tensors of shape `[B]`, so one call serves a batch whose rows asked
for different settings. A neutral value switches a processor off for its row (temperature
1, top_k 0, top_p 1, min_p 0, repetition_penalty 1).

The order is the one of transformers' `generate`: repetition penalty, temperature, top-k,
top-p, min-p, then sample (or argmax for greedy rows). A row with a `TokenConstraint` (structured
output) has the tokens its grammar forbids masked to -inf first, and its constraint advanced
past the chosen token: `sample_tokens` does all of it, and is what engines call. No
logits a valid request can lead to make it raise: a sampled row whose processed logits are
not finite is drawn by their limit (`sampling_probs`), and a row whose grammar allows
nothing is reported, not drawn from.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from flora_server.engine.constraints import (
    TokenConstraint,
    allocate_bitmask,
    dead_end_message,
    unpack_bitmask,
)
from flora_server.engine.protocol import GrammarDeadEndError, Logprob, SamplingParams
from flora_server.engine.text import in_context


class SamplingTensors:
    """The sampling parameters of a batch, one entry per row, on the logits' device.

    Which processors some sampling row switches on is known on the host (`sampling`,
    `*_on`): a batch of greedy rows is an argmax, not two sorts of the vocabulary per
    step (an off processor is the identity, so skipping it changes no value). Each
    tensor is built on first use, so such a batch copies none of them to the device
    (each is a host-to-device copy per step)."""

    def __init__(
        self, params: Sequence[SamplingParams], device: torch.device | str = "cpu"
    ) -> None:
        self._params = list(params)
        self._device = device
        sampled = [p for p in self._params if p.do_sample]
        self.sampling = bool(sampled)
        self.temperature_on = any(_temperature(p) != 1.0 for p in sampled)
        self.top_k_on = any((p.top_k or 0) > 0 for p in sampled)
        self.top_p_on = any(p.top_p is not None and p.top_p < 1.0 for p in sampled)
        self.min_p_on = any(p.min_p > 0.0 for p in sampled)

    @classmethod
    def from_params(
        cls, params: Sequence[SamplingParams], device: torch.device | str = "cpu"
    ) -> SamplingTensors:
        return cls(params, device)

    def _col(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self._device)

    @functools.cached_property
    def do_sample(self) -> torch.Tensor:  # [B] bool
        return self._col([p.do_sample for p in self._params], torch.bool)

    @functools.cached_property
    def temperature(self) -> torch.Tensor:  # [B] float32, > 0
        return self._col([_temperature(p) for p in self._params], torch.float32)

    @functools.cached_property
    def top_k(self) -> torch.Tensor:  # [B] int64, 0 = off
        return self._col([p.top_k or 0 for p in self._params], torch.int64)

    @functools.cached_property
    def top_p(self) -> torch.Tensor:  # [B] float32, 1.0 = off
        return self._col([1.0 if p.top_p is None else p.top_p for p in self._params], torch.float32)

    @functools.cached_property
    def min_p(self) -> torch.Tensor:  # [B] float32, 0.0 = off
        return self._col([p.min_p for p in self._params], torch.float32)

    @functools.cached_property
    def repetition_penalty(self) -> torch.Tensor:  # [B] float32, 1.0 = off
        return self._col([p.repetition_penalty for p in self._params], torch.float32)


def _temperature(p: SamplingParams) -> float:
    """A row's temperature as the processors divide by it (kept above 0)."""
    return max(p.temperature, 1e-5)


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor
) -> torch.Tensor:
    """CTRL-style penalty (Keskar et al. 2019), as in transformers: for every token already
    seen by the row (prompt or generated), `l' = l / p` if `l > 0` else `l * p`.

    logits: [B, V]; seen: [B, V] bool; penalty: [B]. Rows with p = 1 are unchanged.
    """
    p = penalty.to(logits.dtype).unsqueeze(1)  # [B, 1]
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def seen_mask(
    token_ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str
) -> torch.Tensor:
    """[B, V] bool: True where the row's token list contains the token."""
    mask = torch.zeros(len(token_ids), vocab_size, dtype=torch.bool, device=device)
    for row, ids in enumerate(token_ids):
        if ids:
            mask[row, torch.tensor(list(ids), dtype=torch.long, device=device)] = True
    return mask


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """`l / T` per row. logits: [B, V]; temperature: [B] (> 0)."""
    return logits / temperature.to(logits.dtype).unsqueeze(1)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th are kept), set the rest to
    -inf. logits: [B, V]; top_k: [B] int, 0 = keep all."""
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    sorted_desc = logits.sort(dim=-1, descending=True).values  # [B, V]
    kth = sorted_desc.gather(1, (k - 1).unsqueeze(1))  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2020): keep the smallest set of most likely tokens
    whose probability mass reaches p; the most likely token is always kept.

    Sorted descending with probabilities q_1 >= q_2 >= ..., token i is dropped when the mass
    before it, sum_{j<i} q_j, is already >= p. logits: [B, V]; top_p: [B], 1.0 = keep all.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # [B, V]
    drop_sorted = mass_before >= top_p.to(probs.dtype).unsqueeze(1)
    # p >= 1 is off: the rounded cumsum can reach 1.0 before the tail and drop it.
    drop_sorted &= (top_p < 1.0).unsqueeze(1)
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Keep the tokens whose probability is at least min_p times the row's most likely
    token's (Nguyen et al. 2024, vLLM's and transformers' `min_p`); the most likely token is
    always kept. logits: [B, V]; min_p: [B], 0.0 = keep all."""
    probs = logits.softmax(dim=-1)
    floor = min_p.to(probs.dtype).unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < floor, float("-inf"))


def process_logits(
    logits: torch.Tensor, params: SamplingTensors, seen: torch.Tensor | None
) -> torch.Tensor:
    """All processors in transformers' order. logits: [B, V] float32 -> [B, V]. `seen` may
    be None when no row uses a repetition penalty."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature_on:
        logits = apply_temperature(logits, torch.where(params.do_sample, params.temperature, 1.0))
    if params.top_k_on:
        logits = apply_top_k(logits, torch.where(params.do_sample, params.top_k, 0))
    if params.top_p_on:
        logits = apply_top_p(logits, torch.where(params.do_sample, params.top_p, 1.0))
    if params.min_p_on:
        logits = apply_min_p(logits, torch.where(params.do_sample, params.min_p, 0.0))
    return logits


def select_tokens(
    logits: torch.Tensor,
    do_sample: torch.Tensor | None,
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Pick one token per row: argmax for greedy rows, a draw from softmax(logits) for
    sampling rows using the row's own generator (so a seeded request reproduces its output
    whatever else is in the batch). logits: [B, V] (processed); returns [B] int64.
    `do_sample` None says no row samples (no device sync). A sampling row never raises on
    logits that are not finite (`sampling_probs`)."""
    tokens = logits.argmax(dim=-1)
    if do_sample is None:
        return tokens
    rows = do_sample.nonzero().flatten().tolist()
    if rows:
        probs, drawable = sampling_probs(logits[rows])  # [S, V], [S]
        for i, (row, ok) in enumerate(zip(rows, drawable.tolist(), strict=True)):
            if ok:  # else the row keeps its argmax: no token has a probability to draw
                tokens[row] = torch.multinomial(probs[i], 1, generator=generators[row])[0]
    return tokens


def sampling_probs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(logits) per row, defined for logits that are not all finite.

    A NaN logit is never drawn (as -inf); +inf logits share the row's mass equally (the
    limit of softmax as they grow), where a plain softmax would give NaN and
    `torch.multinomial` raise. logits: [S, V] -> (probs [S, V] float32, drawable [S] bool):
    a row with every logit -inf or NaN has no distribution (drawable False, probs NaN)."""
    x = logits.float()
    x = torch.where(x.isnan(), float("-inf"), x)
    pos_inf = x == float("inf")
    x = torch.where(pos_inf.any(dim=-1, keepdim=True), pos_inf.float().log(), x)
    drawable = (x > float("-inf")).any(dim=-1)
    return x.softmax(dim=-1), drawable


def allowed_tokens(constraints: Sequence[TokenConstraint | None], vocab_size: int) -> torch.Tensor:
    """[B, V] bool on the host: the tokens each row's grammar allows next (every token for a
    free row)."""
    bitmask = allocate_bitmask(len(constraints), vocab_size, "cpu")  # matchers write host memory
    for i, constraint in enumerate(constraints):
        if constraint is not None:
            constraint.fill_bitmask(bitmask, i)
    return unpack_bitmask(bitmask, vocab_size)


def sample_tokens(
    logits: torch.Tensor,
    params: SamplingTensors,
    seen: torch.Tensor | None,
    generators: Sequence[torch.Generator | None],
    constraints: Sequence[TokenConstraint | None] | None = None,
    held: torch.Tensor | None = None,
    only: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[int, Exception]]:
    """Constrain, process and select one token per row, then advance each row's constraint
    past its token. logits: [B, V] float32 (raw). `only` [B, V] bool on the host (None:
    every token) marks the tokens a row may ever pick (vLLM's `allowed_token_ids`), on top
    of its grammar. `held` [B, V] bool (None: none) marks the tokens a row may not pick yet
    (its end, under vLLM's `min_tokens`); they are masked where the row's grammar allows
    anything else, so a grammar that can only end still ends.

    Returns the tokens [B] int64 and the rows the engine must fail, each with its error
    (the others are unaffected): a row whose grammar allows no token and not the end
    either has reached a dead end, so no text matches the grammar (`GrammarDeadEndError`,
    the client's 422; its token is a placeholder and its constraint does not advance); a
    row whose grammar refused the token its own mask allowed is a matcher bug (a
    ValueError, a 500)."""
    failed: dict[int, Exception] = {}
    allowed = only
    if constraints is not None:
        grammar = allowed_tokens(constraints, logits.shape[-1])  # [B, V] on the host
        allowed = grammar if only is None else grammar & only
    if allowed is not None:
        for row in (~allowed.any(dim=-1)).nonzero().flatten().tolist():
            constraint = None if constraints is None else constraints[row]
            message, field = (
                dead_end_message(constraint)
                if constraint is not None
                else ("no token is allowed", "allowed_token_ids")
            )
            if constraint is not None and only is not None and not bool(only[row].all()):
                message += " among allowed_token_ids"
            failed[row] = GrammarDeadEndError(message, param=field)
            allowed[row] = True  # a placeholder draw, never emitted
        logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
    if held is not None:
        held = held & (logits > float("-inf")).logical_and(~held).any(dim=-1, keepdim=True)
        logits = logits.masked_fill(held, float("-inf"))
    processed = process_logits(logits, params, seen)
    tokens = select_tokens(processed, params.do_sample if params.sampling else None, generators)
    if constraints is not None:
        for row, (constraint, token) in enumerate(zip(constraints, tokens.tolist(), strict=True)):
            if constraint is None or row in failed or constraint.is_terminated():
                continue
            if not constraint.accept(token):
                failed[row] = ValueError(f"the output grammar refused token {token}")
    return tokens, failed


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A per-request generator: seeded when the request gave a seed, else from entropy."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


# -- log-probabilities reported to the client (not used for choosing tokens) ----------


def chosen_and_top(
    logprobs: torch.Tensor, tokens: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logprob of each row's token and the row's `n` most likely tokens.

    logprobs: [B, V] (log_softmax of the raw logits); tokens: [B] int64.
    Returns (chosen [B], top_values [B, n], top_ids [B, n]), best first.
    """
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    top = logprobs.topk(min(n, logprobs.shape[-1]), dim=-1)
    return chosen, top.values, top.indices


def prompt_logprobs(
    logits: torch.Tensor, prompt: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logprob of every prompt token after the first given the ones before it.

    logits: [L, V] (all positions of one unpadded prompt); prompt: [L] int64.
    Returns (chosen [L-1], top_values [L-1, n], top_ids [L-1, n]) for tokens 1..L-1.
    """
    logprobs = logits[:-1].float().log_softmax(dim=-1)  # position t predicts token t+1
    return chosen_and_top(logprobs, prompt[1:], n)


def prompt_logprob_entries(
    ids: Sequence[int],
    chosen: Sequence[float],
    top_values: Sequence[Sequence[float]],
    top_ids: Sequence[Sequence[int]],
    n: int,
    decode: Callable[[list[int]], str],
) -> tuple[Logprob, ...]:
    """What the client gets for a prompt: every token with its logprob (None for the first)
    and its `n` most likely alternatives, each with its own text in context
    (`text.in_context`: the tokens' texts concatenate to the prompt decoded whole).
    chosen / top_*: for tokens 1..L-1."""
    out = [Logprob(ids[0], "", None)]
    for t, lp, vs, ts in zip(ids[1:], chosen, top_values, top_ids, strict=True):
        top = tuple(Logprob(a, "", b) for a, b in zip(ts[:n], vs, strict=False))
        out.append(Logprob(t, "", lp, top))
    return in_context(out, decode)
