"""Structured output: per-row token constraints (JSON object / JSON Schema) via xgrammar.

A `TokenConstraint` is carried by one `GenerationRequest` and consulted at every step of
that row only, so constrained and free rows (and rows for different adapters) share one
batch. The protocol is the one of grammar matchers (xgrammar, llguidance):

- `fill_bitmask(bitmask, row)`: write the tokens allowed next into row `row` of a packed
  int32 bitmask `[B, ceil(V / 32)]` (bit `t % 32` of word `t // 32` set = token t allowed);
- `accept(token)`: advance past the token that was chosen (False: the grammar refused it);
- `is_terminated()`: the grammar has ended (after its stop token).

`engine/sampling.py` applies the masks and advances the constraints in one place
(`sample_tokens`), so every engine that samples through it supports constraints.

When the grammar is complete the mask allows only the stop tokens, which are the engine's
EOS ids, so a constrained row ends with finish reason "eos" as soon as its JSON is whole
(the API turns `ignore_eos` off for a constrained request: its grammar's end is its end).
A matcher that has accepted its stop token still answers `fill_bitmask`, with the stop
tokens only. A grammar can also reach a dead end, a point where it allows no token and not
the end either (the regex `ab[^\\s\\S]` after `ab`): no output matches it, so the request
fails with `protocol.GrammarDeadEndError`, a 422 naming the field the grammar came from.

xgrammar was chosen over llguidance and outlines-core: the mask costs about the same as
llguidance's per token (see docs/performance.md), grammars compile ahead of the first step
(a bad schema is a 422 before anything is queued) and are cached by the compiler, and it
is the default grammar back end of vLLM and SGLang.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

# JSON output without free whitespace: a small model given a choice can emit spaces or
# newlines until max_tokens; with fixed separators it must make progress.
_SEPARATORS = (", ", ": ")


class TokenConstraint(Protocol):
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None: ...

    def accept(self, token: int) -> bool: ...

    def is_terminated(self) -> bool: ...


@dataclass(frozen=True)
class ConstraintSpec:
    """What a request asked for: any JSON object, JSON matching `schema` (`{}`: any JSON
    value), or text matching the regular expression `pattern` (TGI's `grammar` of type
    `regex`). `field` names the request field it came from, for errors found while
    generating."""

    kind: Literal["json_object", "json_schema", "regex"]
    schema: dict[str, Any] | None = None
    pattern: str | None = None
    field: str | None = None

    @property
    def what(self) -> str:
        return "regular expression" if self.kind == "regex" else "JSON schema"


class ConstraintError(ValueError):
    """The schema cannot be compiled (unsupported keyword, malformed schema)."""


def dead_end_message(constraint: TokenConstraint | None) -> tuple[str, str]:
    """The 422 for a row whose grammar reached a dead end (`GrammarDeadEndError`): its
    message and the request field its spec came from (a constraint without one:
    "grammar")."""
    spec = getattr(constraint, "spec", None)
    field = (spec.field if isinstance(spec, ConstraintSpec) else None) or "grammar"
    what = spec.what if isinstance(spec, ConstraintSpec) else "grammar"
    message = (
        f"{field}: no output can match the {what}: after the text generated so far it "
        "allows neither another token nor the end"
    )
    return message, field


class _XgrammarConstraint:
    def __init__(self, matcher: Any, spec: ConstraintSpec) -> None:
        self._matcher = matcher
        self.spec = spec

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        if self._matcher.is_terminated():
            # xgrammar refuses to mask after its stop token; the grammar has ended, so
            # only a stop token may follow (a caller that runs the row on through EOS).
            set_only(bitmask, row, self._matcher.stop_token_ids)
            return
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        return bool(self._matcher.accept_token(token))

    def is_terminated(self) -> bool:
        return bool(self._matcher.is_terminated())

    def reset(self) -> None:
        """Back to the start of the grammar (benchmarks reuse one matcher)."""
        self._matcher.reset()


class GrammarCompiler:
    """Compiles `ConstraintSpec`s into fresh per-request constraints for one tokenizer.

    Thread-safe; compiled grammars are cached by xgrammar (keyed by the schema text), so
    repeated schemas cost one matcher allocation. `vocab_size` is the model's logits width
    (it may exceed the tokenizer's); `stop_token_ids` are the engine's EOS ids.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int]) -> None:
        import xgrammar

        self._xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids)
        )
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=2)
        self._lock = threading.Lock()
        self.vocab_size = vocab_size

    def compile(self, spec: ConstraintSpec) -> TokenConstraint:
        """A new constraint at the start of the grammar (blocking: call off the event loop).
        Raises ConstraintError for a schema xgrammar cannot compile."""
        try:
            with self._lock:
                if spec.kind == "regex":
                    grammar = self._compiler.compile_regex(spec.pattern or "")
                else:
                    schema = spec.schema if spec.kind == "json_schema" else {"type": "object"}
                    grammar = self._compiler.compile_json_schema(
                        json.dumps(schema, sort_keys=True),
                        any_whitespace=False,
                        separators=_SEPARATORS,
                        strict_mode=True,
                    )
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ConstraintError(f"cannot compile the {spec.what}: {exc}") from None
        return _XgrammarConstraint(self._xgr.GrammarMatcher(grammar), spec)


def allocate_bitmask(batch: int, vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """An all-allowed packed bitmask `[B, ceil(V / 32)]` int32."""
    return torch.full((batch, (vocab_size + 31) // 32), -1, dtype=torch.int32, device=device)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`[B, W]` int32 packed -> `[B, V]` bool (True = allowed)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [B, W, 32]
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def set_only(bitmask: torch.Tensor, row: int, tokens: Iterable[int]) -> None:
    """Allow exactly `tokens` in row `row` of a packed bitmask `[B, W]` int32."""
    words = [0] * bitmask.shape[1]
    for t in tokens:
        words[t // 32] |= 1 << (t % 32)
    signed = [w - (1 << 32) if w >= 1 << 31 else w for w in words]  # int32's bit 31
    bitmask[row] = torch.tensor(signed, dtype=torch.int32, device=bitmask.device)
