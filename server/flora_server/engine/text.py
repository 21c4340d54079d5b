"""Incremental detokenisation with stop sequences and hold-back.

Each step decodes only a window of the newest ids, as TGI and vLLM do: the ids from the
previous step's read point (`prefix`) on, minus what those context ids alone decode to, is
the new text. The context keeps what a token's text depends on its left neighbour for
(SentencePiece's leading space, a multi-byte character split over tokens); decoding every
generated id each step made a request's detokenisation quadratic in its length. A window
that ends in an incomplete UTF-8 sequence (U+FFFD) adds nothing until a later token
completes it. The final push decodes all ids once. Released is only text that can no
longer change: a suffix that could still grow into a stop sequence is held back. When a
stop sequence appears, the text before it is released and the row ends with reason "stop".
The concatenation of everything released equals the final `generated_text` (the stop
sequence itself is not included).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

REPLACEMENT_CHAR = "\ufffd"


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int:
    """Index of the earliest occurrence of any stop sequence at or after `start`, or -1."""
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else -1


def partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop sequence
    (that much text must be held back: the next token may complete the stop)."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


@dataclass
class TextStream:
    """Turns a growing list of token ids into released text pieces for one request."""

    decode: Callable[[list[int]], str]
    stops: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)
    released: str = ""
    stopped: bool = False
    text: str = field(default="", init=False)  # the ids decoded so far, up to `_read`
    _prefix: int = field(default=0, init=False, repr=False)  # first id of the context window
    _read: int = field(default=0, init=False, repr=False)  # ids before this are in `text`

    def push(self, token_id: int | None, final: bool = False) -> str:
        """Add a token (None: none, e.g. EOS which is not text) and return the newly released
        text. `final=True` flushes what was held back. Sets `stopped` when a stop sequence
        appeared; the returned text then ends just before it."""
        if token_id is not None:
            self.token_ids.append(token_id)
        text = self.decode(self.token_ids) if final else self._decode_new()
        if not text.startswith(self.released):
            # A tokenizer whose decoding of a longer list rewrites earlier characters
            # (rare: clean-up of spaces): keep what was released and append the new tail.
            text = self.released + text[len(self.released) :]
        search_from = max(0, len(self.released) - max((len(s) for s in self.stops), default=0))
        stop_at = find_stop(text, self.stops, search_from) if self.stops else -1
        if stop_at >= 0:
            self.stopped = True
            end = max(stop_at, len(self.released))
        elif final:
            end = len(text)
        else:
            end = len(text) - partial_stop_len(text, self.stops)
            if text[:end].endswith(REPLACEMENT_CHAR):
                end = len(text[:end].rstrip(REPLACEMENT_CHAR))
            end = max(end, len(self.released))
        piece = text[len(self.released) : end]
        self.released += piece
        return piece

    def _decode_new(self) -> str:
        """`text` extended by the window's new text, once the window decodes to complete
        characters beyond its context."""
        ids = self.token_ids
        if self._read == len(ids):
            return self.text
        context = self.decode(ids[self._prefix : self._read]) if self._read > self._prefix else ""
        window = self.decode(ids[self._prefix :])
        if len(window) > len(context) and not window.endswith(REPLACEMENT_CHAR):
            self.text += window[len(context) :]
            self._prefix, self._read = self._read, len(ids)
        return self.text
