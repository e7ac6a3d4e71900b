"""Streaming detokenization and stop sequences."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerBase

from backend.replica.detokenizer import IncrementalDetokenizer, StopSequenceFilter


class ByteTokenizer:
    """One token per UTF-8 byte: the hardest case for streaming multi-byte characters."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(token_ids).decode(errors="replace")


@pytest.mark.parametrize(
    "text", ["hello world", " 안녕하세요, 세계!", "emoji 🎉👍🏽 ok", "é\u0301"]
)
def test_deltas_concatenate_to_the_full_decode_and_never_split_a_character(text: str) -> None:
    tokenizer = ByteTokenizer()
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push(t) for t in tokenizer.encode(text)] + [detokenizer.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_incomplete_character_at_the_end_is_flushed_as_replacement() -> None:
    detokenizer = IncrementalDetokenizer(ByteTokenizer())
    assert detokenizer.push(0xF0) == ""  # first byte of a 4-byte emoji
    assert detokenizer.flush() == "\ufffd"


@pytest.mark.parametrize(
    ("pieces", "stops", "expected", "stopped"),
    [
        (["Hello", " wor", "ld"], ("STOP",), "Hello world", False),
        (["Hello ST", "OP there"], ("STOP",), "Hello ", True),
        (["a", "b", "</", "s", ">", "c"], ("</s>",), "ab", True),
        (["x<", "y"], ("<z>",), "x<y", False),
        (["one\n\nUser:"], ("\n\nUser:", "###"), "one", True),
        (["pre###", "post"], ("\n\nUser:", "###"), "pre", True),
    ],
)
def test_stop_filter_cuts_at_the_first_stop_and_never_leaks_part_of_it(
    pieces: list[str], stops: tuple[str, ...], expected: str, stopped: bool
) -> None:
    stop_filter = StopSequenceFilter(stops)
    emitted = ""
    hit = False
    for piece in pieces:
        text, hit = stop_filter.feed(piece)
        emitted += text
        if hit:
            break
    if not hit:
        emitted += stop_filter.flush()
    assert (emitted, hit) == (expected, stopped)


def test_stop_filter_holds_back_a_possible_stop_prefix() -> None:
    stop_filter = StopSequenceFilter(("STOP",))
    assert stop_filter.feed("go ST") == ("go ", False)
    assert stop_filter.feed("AR") == ("STAR", False)


# SentencePiece as Mistral uses it: `▁` marks a space, unseen characters fall back to bytes.
SENTENCEPIECE_TEXTS = [
    "Hello world",
    "  two leading spaces and  a double one",
    "new\nlines\tand tabs",
    "こんにちは 世界",  # not in the tokenizer's training text: byte-fallback pieces
    "family 👩\u200d👩\u200d👧 and 🎉",
]


@pytest.mark.parametrize("text", SENTENCEPIECE_TEXTS)
def test_sentencepiece_deltas_rebuild_the_text(
    mistral_tokenizer: PreTrainedTokenizerBase, text: str
) -> None:
    ids = mistral_tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(mistral_tokenizer)
    deltas = [detokenizer.push(t) for t in ids] + [detokenizer.flush()]
    assert "".join(deltas) == mistral_tokenizer.decode(ids)
    assert all("\ufffd" not in d for d in deltas)


def test_byte_fallback_really_happens(mistral_tokenizer: PreTrainedTokenizerBase) -> None:
    pieces = mistral_tokenizer.convert_ids_to_tokens(
        mistral_tokenizer.encode("こんにちは", add_special_tokens=False)
    )
    assert any(piece.startswith("<0x") for piece in pieces), pieces


def test_stop_string_split_across_sentencepiece_pieces(
    mistral_tokenizer: PreTrainedTokenizerBase,
) -> None:
    text = "The capital of France is Paris, and the capital of Italy is Rome."
    ids = mistral_tokenizer.encode(text, add_special_tokens=False)
    stop = "Paris, and"
    assert all(stop not in mistral_tokenizer.decode([t]) for t in ids)  # it spans pieces
    detokenizer = IncrementalDetokenizer(mistral_tokenizer)
    stops = StopSequenceFilter((stop,))
    emitted = ""
    for token in ids:
        text_out, stopped = stops.feed(detokenizer.push(token))
        emitted += text_out
        if stopped:
            break
    assert stopped and emitted == "The capital of France is "
