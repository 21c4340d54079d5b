"""Incremental detokenisation with stop sequences and hold-back.

Each step decodes only a window of the newest ids, as TGI and vLLM do: the ids from the
previous step's read point (`prefix`) on, minus what those context ids alone decode to, is
the new text. The context keeps what a token's text depends on its left neighbour for
(SentencePiece's leading space, a multi-byte character split over tokens); decoding every
generated id each step made a request's detokenisation quadratic in its length. A window
that ends in an incomplete UTF-8 sequence (U+FFFD) adds nothing until a later token
completes it. The final push decodes all ids once.

Two texts come out of each token:

- its own text (`TextStream.token_text`, `text_of`), what logprobs and TGI's `token.text`
  report: the text the token adds in context, so a token ending inside a multi-byte
  character has "" and the token completing it has the whole character (TGI's
  `decode_token`, vLLM's corrected logprob tokens). The own texts concatenate to the
  decoded ids.
- the released piece (what `push` returns): only text that can no longer change. A suffix
  that could still grow into a stop sequence is held back. When a stop sequence appears,
  the text before it is released and the row ends with reason "stop". The concatenation of
  everything released equals the final `generated_text` (the stop sequence itself is not
  included).

vLLM's `min_tokens` suspends stop sequences (`stops_from`): no stop in the text of the
first `min_tokens` tokens ends the request; from the next token on one does if it ends in
that later text (one that began earlier and is completed by a later token counts), as
vLLM's detokenizer checks them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from flora_server.engine.protocol import Logprob

REPLACEMENT_CHAR = "\ufffd"


def find_stop(text: str, stops: Sequence[str], start: int = 0, ends_after: int = 0) -> int:
    """Index of the earliest occurrence of any stop sequence that starts at or after
    `start` and ends after `ends_after` characters of `text`, or -1."""
    starts = (text.find(s, max(start, ends_after - len(s) + 1)) for s in stops if s)
    hits = [i for i in starts if i >= 0]
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
    stops_from: int = 0  # the text of this many first tokens holds no stop that counts
    token_ids: list[int] = field(default_factory=list)
    released: str = ""
    stopped: bool = False
    text: str = field(default="", init=False)  # the ids decoded so far, up to `_read`
    # The own text of the token the last `push` added ("" for none, e.g. EOS).
    token_text: str = field(default="", init=False)
    _prefix: int = field(default=0, init=False, repr=False)  # first id of the context window
    _read: int = field(default=0, init=False, repr=False)  # ids before this are in `text`
    _context: tuple[int, int, str] = field(default=(0, 0, ""), init=False, repr=False)
    # A stop sequence must end after this many characters of `text` (`stops_from`).
    _stop_floor: int = field(default=0, init=False, repr=False)

    def push(self, token_id: int | None, final: bool = False) -> str:
        """Add a token (None: none, e.g. EOS which is not text) and return the newly released
        text; `token_text` becomes the token's own text. `final=True` flushes what was held
        back. Sets `stopped` when a stop sequence appeared; the returned text then ends just
        before it."""
        before = self.text
        if token_id is not None:
            self.token_ids.append(token_id)
        text = self.decode(self.token_ids) if final else self._decode_new()
        self.token_text = "" if token_id is None else self._own_text(text, before)
        if not text.startswith(self.released):
            # A tokenizer whose decoding of a longer list rewrites earlier characters
            # (rare: clean-up of spaces): keep what was released and append the new tail.
            text = self.released + text[len(self.released) :]
        stop_at = -1
        if len(self.token_ids) <= self.stops_from:
            self._stop_floor = len(text)  # stops are suspended: this text cannot end it
        elif self.stops:
            longest = max(len(s) for s in self.stops)
            search_from = max(0, len(self.released) - longest)
            stop_at = find_stop(text, self.stops, search_from, self._stop_floor)
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

    def text_of(self, token_id: int) -> str:
        """The own text `token_id` would have as the next token (an alternative at this
        position), by the rule `token_text` follows."""
        return self._window_text([*self.token_ids[self._prefix :], token_id])

    def _own_text(self, text: str, before: str) -> str:
        """The pushed token's own text: what it added to the decoded text `before` it. On
        the final push `text` decodes every id, so the last token also takes an incomplete
        character left at the end and the own texts concatenate to that full decode."""
        if text.startswith(before):
            return text[len(before) :]
        return self._window_text(self.token_ids[self._prefix :])

    def _window_text(self, window_ids: list[int]) -> str:
        """What `window_ids` (the context window and what follows it) decode to beyond the
        context; "" while that ends inside a character."""
        window = self.decode(window_ids)
        context = self._context_text()
        if len(window) > len(context) and not window.endswith(REPLACEMENT_CHAR):
            return window[len(context) :]
        return ""

    def _context_text(self) -> str:
        """The context ids decoded (cached: every alternative of a position shares it)."""
        prefix, read, text = self._context
        if (prefix, read) != (self._prefix, self._read):
            ids = self.token_ids[self._prefix : self._read]
            text = self.decode(ids) if ids else ""
            self._context = (self._prefix, self._read, text)
        return text

    def _decode_new(self) -> str:
        """`text` extended by the window's new text, once the window decodes to complete
        characters beyond its context."""
        ids = self.token_ids
        if self._read == len(ids):
            return self.text
        new = self._window_text(ids[self._prefix :])
        if new:
            self.text += new
            self._prefix, self._read = self._read, len(ids)
        return self.text


def in_context(
    entries: Sequence[Logprob], decode: Callable[[list[int]], str]
) -> tuple[Logprob, ...]:
    """`entries` (a sequence's tokens in order, e.g. a prompt's, each with its alternatives)
    with every text replaced by its own text in context (`TextStream.token_text`): the texts
    of the tokens concatenate to the whole sequence decoded at once, and an alternative has
    the text it would have had in the token's place."""
    stream = TextStream(decode)
    out = []
    for i, entry in enumerate(entries):
        top = tuple(replace(a, text=stream.text_of(a.token_id)) for a in entry.top)
        stream.push(entry.token_id, final=i == len(entries) - 1)
        out.append(replace(entry, text=stream.token_text, top=top))
    return tuple(out)
