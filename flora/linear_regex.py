"""Regular expressions from adapter configs, matched in time linear in the name.

Module selections (``target_modules`` / ``train_modules`` given as a regex string, PEFT's
``rank_pattern`` / ``alpha_pattern`` keys) come with adapters, and an adapter is untrusted
input on a server. Python's ``re`` backtracks: a pattern such as ``(.*.*)*z`` holds the
interpreter, and with it every thread of a server, for minutes on one module name. These
patterns therefore run on RE2 (the ``google-re2`` package), whose matching time is linear in
the text. A pattern is read as Python reads it first (what PEFT and transformers accept),
then compiled for RE2; RE2 has no linear-time form for look-around or back-references, and
such a pattern is refused.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import re2  # type: ignore[import-untyped]

__all__ = ["MAX_PATTERN_CHARS", "compile_linear"]

MAX_PATTERN_CHARS = 4096
_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # a refused pattern is reported to its sender, not to stderr


@functools.lru_cache(maxsize=1024)
def compile_linear(pattern: str) -> Any:
    """``pattern`` compiled for RE2 (``.match`` / ``.fullmatch`` / ``.search`` as ``re``'s).
    Raises ``ValueError`` saying why: too long, not a regular expression Python can read,
    or syntax RE2 does not run (look-around, back-references, ...)."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"has {len(pattern)} characters; at most {MAX_PATTERN_CHARS} are read")
    try:
        re.compile(pattern)  # compiling never backtracks
    except re.error as exc:
        raise ValueError(f"is not a valid regex: {exc}") from None
    try:
        return re2.compile(pattern, _OPTIONS)
    except re2.error:
        raise ValueError(
            "uses regex syntax that cannot be matched in linear time (look-around, "
            "back-references, ...); module patterns run on RE2"
        ) from None
