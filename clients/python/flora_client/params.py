"""The keyword parameters of each inference method, typed.

Every method takes them as ``**params: Unpack[...]``: a type checker checks names and types,
and at run time `check` raises TypeError for a name the method does not know (a typo such as
``max_token`` never reaches the server as a silently ignored field).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypedDict


class GenerateParams(TypedDict, total=False):
    """``/generate`` and ``/generate_stream`` (TGI/LoRAX names)."""

    max_new_tokens: int
    do_sample: bool
    temperature: float  # > 0; omit it (or do_sample=False) for greedy
    top_k: int
    top_p: float
    seed: int
    stop: str | Sequence[str]
    repetition_penalty: float
    details: bool
    decoder_input_details: bool  # prompt tokens with their logprobs in details.prefill
    return_full_text: bool
    top_n_tokens: int  # most likely alternatives per generated token
    truncate: int  # keep only the last N prompt tokens
    ignore_eos_token: bool


class CompletionParams(TypedDict, total=False):
    """``/v1/completions`` (OpenAI names; max_new_tokens is accepted for max_tokens)."""

    max_tokens: int
    max_new_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    top_k: int
    stop: str | Sequence[str]
    seed: int
    repetition_penalty: float
    logprobs: int  # alternatives per token (0: the token's own logprob only)
    echo: bool  # with logprobs: the prompt tokens' logprobs too


class ChatParams(TypedDict, total=False):
    """``/v1/chat/completions`` (OpenAI names; max_new_tokens is accepted for max_tokens)."""

    max_tokens: int
    max_completion_tokens: int
    max_new_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    top_k: int
    stop: str | Sequence[str]
    seed: int
    repetition_penalty: float
    logprobs: bool
    top_logprobs: int


def check(method: str, params: Mapping[str, Any], allowed: type) -> dict[str, Any]:
    """``params`` as a dict; TypeError (as Python words it) for a name not in ``allowed``."""
    names = allowed.__annotations__
    for name in params:
        if name not in names:
            raise TypeError(f"{method}() got an unexpected keyword argument {name!r}")
    return dict(params)
