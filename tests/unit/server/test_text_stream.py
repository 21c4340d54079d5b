"""Incremental detokenisation (`engine/text.py`): the window decode releases the same text
as decoding every id each step, on decoders whose text depends on neighbours (bytes split
inside a UTF-8 character, a leading space dropped at the start of a decode)."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from flora_server.engine.text import TextStream

WORDS = [" the", "cat", " é", "\u00e9", "😀", " ", "x", "<st", "op>"]


def byte_decode(ids: list[int]) -> str:
    """Byte-level BPE in miniature: each id one byte; a character may span ids."""
    return bytes(ids).decode("utf-8", errors="replace")


def piece_decode(ids: list[int]) -> str:
    """SentencePiece in miniature: pieces joined, the decode's leading space dropped."""
    return "".join(WORDS[i] for i in ids).removeprefix(" ")


class FullDecode(TextStream):
    """The reference: every push decodes all ids."""

    def _decode_new(self) -> str:
        return self.decode(self.token_ids)


def run(stream: TextStream, ids: list[int]) -> tuple[list[str], str]:
    pieces = []
    for i, token in enumerate(ids):
        pieces.append(stream.push(token, final=i == len(ids) - 1))
        if stream.stopped:
            break
    return pieces, stream.released


def check(decode: Callable[[list[int]], str], ids: list[int], stops: tuple[str, ...]) -> None:
    new, new_text = run(TextStream(decode, stops), ids)
    old, old_text = run(FullDecode(decode, stops), ids)
    assert new_text == old_text == "".join(new)
    assert len(new) == len(old)  # a stop sequence ends both on the same token
    released = ""
    for piece in new:
        released += piece
        assert old_text.startswith(released)  # never ahead of, never other than, the full text
    if not stops:
        assert new_text == decode(ids)


utf8_ids = st.text(min_size=1, max_size=30).map(lambda s: list(s.encode()))


@settings(max_examples=200, deadline=None)
@given(ids=utf8_ids, stops=st.sampled_from([(), ("é",), ("ab", "\u00ff")]))
def test_byte_level_text_equals_full_decoding(ids: list[int], stops: tuple[str, ...]) -> None:
    check(byte_decode, ids, stops)


@settings(max_examples=200, deadline=None)
@given(
    ids=st.lists(st.integers(0, len(WORDS) - 1), min_size=1, max_size=30),
    stops=st.sampled_from([(), ("<stop>",), ("cat the",)]),
)
def test_sentencepiece_text_equals_full_decoding(ids: list[int], stops: tuple[str, ...]) -> None:
    check(piece_decode, ids, stops)


def test_each_push_decodes_a_window_not_every_id() -> None:
    lengths: list[int] = []

    def counting(ids: list[int]) -> str:
        lengths.append(len(ids))
        return byte_decode(ids)

    stream = TextStream(counting)
    for token in ("ab" * 200).encode():
        stream.push(token)
    assert stream.released == "ab" * 200
    assert max(lengths) <= 2  # the context id and the new one
    assert len(stream.push(None, final=True)) == 0 and max(lengths) == 400  # one full decode
