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
EOS ids, so a constrained row ends with finish reason "eos" as soon as its JSON is whole.

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
    """What a request asked for: any JSON object, JSON matching `schema`, or text matching
    the regular expression `pattern` (TGI's `grammar` of type `regex`)."""

    kind: Literal["json_object", "json_schema", "regex"]
    schema: dict[str, Any] | None = None
    pattern: str | None = None


class ConstraintError(ValueError):
    """The schema cannot be compiled (unsupported keyword, malformed schema)."""


class _XgrammarConstraint:
    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
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
            what = "regular expression" if spec.kind == "regex" else "JSON schema"
            raise ConstraintError(f"cannot compile the {what}: {exc}") from None
        return _XgrammarConstraint(self._xgr.GrammarMatcher(grammar))


def allocate_bitmask(batch: int, vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """An all-allowed packed bitmask `[B, ceil(V / 32)]` int32."""
    return torch.full((batch, (vocab_size + 31) // 32), -1, dtype=torch.int32, device=device)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`[B, W]` int32 packed -> `[B, V]` bool (True = allowed)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [B, W, 32]
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()
