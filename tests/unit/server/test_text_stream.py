"""Incremental detokenisation (`engine/text.py`): the window decode releases the same text
as decoding every id each step, on decoders whose text depends on neighbours (bytes split
inside a UTF-8 character, a leading space dropped at the start of a decode)."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from flora_server.engine.protocol import Logprob
from flora_server.engine.text import REPLACEMENT_CHAR, TextStream, in_context

WORDS = [" the", "cat", " é", "\u00e9", "😀", " ", "x", "<st", "op>"]


def byte_decode(ids: list[int]) -> str:
    """Byte-level BPE in miniature: each id one byte; a character may span ids."""
    return bytes(ids).decode("utf-8", errors="replace")


def chars(ids: list[int]) -> str:
    return "".join(chr(i) for i in ids)


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


def own_text_reference(decode: Callable[[list[int]], str], ids: list[int], i: int) -> str:
    """Token i's own text from full decodes: what the longest ids[: m], m <= i + 1, that
    decodes to whole characters adds to the same for i (TGI's rule: a token ending inside
    a character adds nothing yet); the last token takes whatever is left."""

    def complete(n: int) -> str:
        while 0 < n < len(ids) and decode(ids[:n]).endswith(REPLACEMENT_CHAR):
            n -= 1
        return decode(ids[:n]) if n else ""

    return complete(i + 1)[len(complete(i)) :]


def own_texts(stream: TextStream, ids: list[int]) -> list[str]:
    """Each token's `token_text`, checking that `text_of` announced it before the push."""
    texts = []
    for i, token in enumerate(ids):
        final = i == len(ids) - 1
        announced = stream.text_of(token)
        stream.push(token, final=final)
        if not final:  # the final push also takes an incomplete character left at the end
            assert announced == stream.token_text
        texts.append(stream.token_text)
    return texts


@settings(max_examples=200, deadline=None)
@given(ids=utf8_ids, stops=st.sampled_from([(), ("é",), ("ab", "\u00ff")]))
def test_byte_level_own_texts_are_each_tokens_characters(
    ids: list[int], stops: tuple[str, ...]
) -> None:
    """A token's own text is the characters it completes, held-back text or not: a token
    ending inside a character has "", the one completing it the whole character."""
    texts = own_texts(TextStream(byte_decode), ids)
    assert texts == [own_text_reference(byte_decode, ids, i) for i in range(len(ids))]
    assert "".join(texts) == byte_decode(ids)
    # A stop sequence holds back or cuts the released text, never a token's own text.
    stream = TextStream(byte_decode, stops)
    for i, token in enumerate(ids):
        stream.push(token, final=i == len(ids) - 1)
        if i < len(ids) - 1:
            assert stream.token_text == texts[i]
        if stream.stopped:
            break


# BPE-like tokens of several bytes: a space with the start of an emoji, its end, é split.
CHUNKS = [b" ", b"a", b" \xf0\x9f\x98", b"\x80", b"caf\xc3", b"\xa9 ", b"\xf0\x9f", b"\x8e\x89"]


def chunk_decode(ids: list[int]) -> str:
    return b"".join(CHUNKS[i] for i in ids).decode("utf-8", errors="replace")


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, len(CHUNKS) - 1), min_size=1, max_size=30))
def test_multi_byte_token_own_texts_wait_for_whole_characters(ids: list[int]) -> None:
    """A token that ends inside a character has "" (its leading space too) and the token
    completing the character has all of it; invalid bytes come out as U+FFFD, as the whole
    decode has them."""
    texts = own_texts(TextStream(chunk_decode, ("é",)), ids)
    assert texts == [own_text_reference(chunk_decode, ids, i) for i in range(len(ids))]
    assert "".join(texts) == chunk_decode(ids)


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, len(WORDS) - 1), min_size=1, max_size=30))
def test_sentencepiece_own_texts_keep_their_leading_space(ids: list[int]) -> None:
    texts = own_texts(TextStream(piece_decode, ("<stop>",)), ids)
    assert texts == [own_text_reference(piece_decode, ids, i) for i in range(len(ids))]
    assert "".join(texts) == piece_decode(ids)


def test_own_text_of_a_held_back_token_and_of_eos() -> None:
    words = ["a", "\n", "The", " answer"]
    stream = TextStream(lambda ids: "".join(words[i] for i in ids), ("\n\nX",))
    got = [(stream.push(t), stream.token_text) for t in (0, 1, 1, 2)]
    assert got == [("a", "a"), ("", "\n"), ("", "\n"), ("\n\nThe", "The")]
    stream = TextStream(decode=chars, stops=("?☃",))
    assert [(stream.push(ord(c)), stream.token_text) for c in "ok?"] == [
        ("o", "o"),
        ("k", "k"),
        ("", "?"),
    ]
    assert (stream.push(None, final=True), stream.token_text) == ("?", "")  # EOS: no text


def test_in_context_texts_concatenate_to_the_whole_decode() -> None:
    """Prompt entries as the engine scores them (each token decoded alone) get their texts
    in context: the prompt's characters split over tokens come back whole, and each
    alternative has the text it would have had in the token's place."""
    ids = list("Emoji 😀🎉 café".encode())
    alone = [byte_decode([t]) for t in ids]
    assert "".join(alone) != byte_decode(ids)  # the bug: "Emoji ���..." joined
    entries = [
        Logprob(t, alone[i], None if i == 0 else -1.0, (Logprob(t + 1, "?", -2.0),))
        for i, t in enumerate(ids)
    ]
    fixed = in_context(entries, byte_decode)
    assert [e.text for e in fixed] == [
        own_text_reference(byte_decode, ids, i) for i in range(len(ids))
    ]
    assert "".join(e.text for e in fixed) == "Emoji 😀🎉 café"
    for i, e in enumerate(fixed):
        assert (e.token_id, e.logprob) == (entries[i].token_id, entries[i].logprob)
        alt = e.top[0]
        assert (alt.token_id, alt.logprob) == (ids[i] + 1, -2.0)
        assert alt.text == own_text_reference(byte_decode, [*ids[:i], ids[i] + 1, 32], i)


def test_stops_from_suspends_stop_sequences_in_the_first_tokens_text() -> None:
    """vLLM's min_tokens: a stop sequence in the text of the first min_tokens tokens does
    not end the request; the first one that ends in a later token's text does."""
    ids = [ord(c) for c in "a\nb\nc\n"]
    assert run(TextStream(chars, ("\n",)), ids)[1] == "a"
    assert run(TextStream(chars, ("\n",), stops_from=1), ids)[1] == "a"  # token 2 is checked
    pieces, text = run(TextStream(chars, ("\n",), stops_from=2), ids)
    assert text == "a\nb" and len(pieces) == 4  # ends at token 4, the second newline
    assert run(TextStream(chars, ("\n",), stops_from=3), ids)[1] == "a\nb"
    assert run(TextStream(chars, ("\n",), stops_from=5), ids)[1] == "a\nb\nc"
    assert run(TextStream(chars, ("\n",), stops_from=6), ids)[1] == "a\nb\nc\n"  # none counts


def test_a_stop_completed_after_the_suspension_counts_from_where_it_began() -> None:
    ids = [ord(c) for c in "xyzxy"]
    # "xy" begins at token 1 and ends at token 2, the first token checked: it stops there.
    pieces, text = run(TextStream(chars, ("xy",), stops_from=1), ids)
    assert text == "" and pieces == ["", ""]
    # With token 2 suspended too, the first "xy" never ends the text; the second does.
    pieces, text = run(TextStream(chars, ("xy",), stops_from=2), ids)
    assert text == "xyz" and len(pieces) == 5
