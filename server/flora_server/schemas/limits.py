"""Field types the request schemas share, so that every body is checked before it is queued
(a 422 naming the field) and nothing a client sends can fail inside the engine worker.

- Numbers are bounded by what the engine takes: a seed must fit torch's 64-bit generator
  seed, counts fit int32 (tensors of them are built per step), floats are finite. A
  repetition penalty p divides or multiplies float32 logits, so it is kept within
  [1/100, 100]: 1e-40 rounds to 0 in float32 and turns the logits into inf and NaN. The
  range is symmetric because p and 1/p are the same strength of penalty and reward (vLLM and
  TGI only ask for p > 0; SGLang documents [0, 2], NVIDIA NIM (0, 2]).
- Text must be valid Unicode: JSON can carry a lone UTF-16 surrogate (`"\\ud800"`), which
  Python keeps in a `str` but which no tokenizer, store path or UTF-8 encoder accepts.
  `ValidText` is the one owner of that check; every text field that reaches the engine,
  the tokenizer or the adapter store uses it.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed
COUNT_MAX = 2**31 - 1  # token counts, ids and k's become int32/int64 tensors
FLOAT_MAX = 100.0  # temperature and repetition penalty: far past any useful value
PENALTY_MIN = 1 / FLOAT_MAX  # rewards repetition as strongly as FLOAT_MAX penalises it


def valid_unicode(text: Any) -> Any:
    """`text` unchanged, or a ValueError naming the first lone surrogate (pydantic turns it
    into a 422 on the field). Runs before pydantic's own str validation, so the message is
    the same in a plain field and inside a union; non-strings pass to that validation."""
    if not isinstance(text, str):
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"contains a lone surrogate (U+{ord(text[exc.start]):04X}) at index {exc.start}: "
            "text must be valid Unicode"
        ) from None
    return text


ValidText = Annotated[str, BeforeValidator(valid_unicode)]

Seed = Annotated[int, Field(ge=0, le=SEED_MAX, description="0 to 2^64-1")]
PositiveCount = Annotated[int, Field(ge=1, le=COUNT_MAX)]
Count = Annotated[int, Field(ge=0, le=COUNT_MAX)]
TokenId = Annotated[int, Field(ge=0, le=COUNT_MAX)]
Temperature = Annotated[float, Field(gt=0, le=FLOAT_MAX, allow_inf_nan=False)]
Penalty = Annotated[
    float, Field(ge=PENALTY_MIN, le=FLOAT_MAX, allow_inf_nan=False, description="0.01 to 100")
]
Probability = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
