"""bench/grammars.py's own logic, without xgrammar (CI does not install it): the seeded decode
both libraries go through, the validity check, and the table and verdict built from the times."""

from __future__ import annotations

import torch

from bench.grammars import (
    DRIVERS,
    HYBRID,
    LLGUIDANCE,
    TOKEN_CAP,
    XGRAMMAR,
    Measured,
    decode,
    follows,
    rows,
    times,
    verdict,
)

VOCAB = 64
EOS = 0


class Scripted:
    """A matcher that allows, at step i, the tokens of `allowed[i]` (the last set ever after),
    and records the tokens it advanced by."""

    def __init__(self, allowed: list[set[int]]) -> None:
        self.allowed = allowed
        self.advanced: list[int] = []

    def mask(self, logits: torch.Tensor) -> None:
        step = min(len(self.advanced), len(self.allowed) - 1)
        banned = torch.ones(len(logits), dtype=torch.bool)
        banned[list(self.allowed[step])] = False
        logits.masked_fill_(banned, float("-inf"))

    def advance(self, token: int) -> None:
        assert token in self.allowed[min(len(self.advanced), len(self.allowed) - 1)]
        self.advanced.append(token)


def test_decode_samples_only_allowed_tokens_and_advances_by_the_end_token_too() -> None:
    matcher = Scripted([{5}, {7, 9}, {EOS}])
    run = decode(matcher, VOCAB, {EOS}, seed=0)
    assert run.ended and run.tokens[0] == 5 and run.tokens[1] in {7, 9} and len(run.tokens) == 2
    assert matcher.advanced == [*run.tokens, EOS]
    assert len(run.mask_s) == len(run.advance_s) == 3


def test_decode_stops_at_the_cap_when_the_grammar_never_ends() -> None:
    run = decode(Scripted([{1, 2, 3}]), VOCAB, {EOS}, seed=0)
    assert not run.ended and len(run.tokens) == len(run.mask_s) == TOKEN_CAP


def test_the_same_masks_and_seed_give_the_same_output_another_seed_another() -> None:
    def script() -> Scripted:
        return Scripted([set(range(1, VOCAB))] * 30 + [{EOS}])

    first, again = decode(script(), VOCAB, {EOS}, 3), decode(script(), VOCAB, {EOS}, 3)
    assert first.tokens == again.tokens
    assert decode(script(), VOCAB, {EOS}, 4).tokens != first.tokens


def test_follows_only_json_that_validates() -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "string", "maxLength": 3}}}
    assert follows('{"ok":"abc"}', schema)
    assert not follows('{"ok":"abcd"}', schema)  # too long
    assert not follows('{"ok":"a\x0e"}', schema)  # a raw control character is not JSON
    assert follows('{"ok":"a\\u000e"}', schema)  # escaped, it is


def measured(scale: float, valid: int) -> Measured:
    """Times 1..100 µs (and ms for compiles) times `scale`."""
    per_token = [scale * i * 1e-6 for i in range(1, 101)]
    return Measured(
        setup_s=scale * 0.5,
        compile_s=[scale * 1e-3, scale * 2e-3, scale * 9e-3],
        mask_s=per_token,
        advance_s=[t / 10 for t in per_token],
        ended=3,
        valid=valid,
    )


ALONE = {LLGUIDANCE: measured(1, 3), XGRAMMAR: measured(4, 2), HYBRID: measured(2, 3)}
DEFAULT = {LLGUIDANCE: measured(10, 3), XGRAMMAR: measured(4, 2), HYBRID: measured(6, 3)}


def test_rows_give_each_library_its_median_and_p99() -> None:
    table = {measure: cell for measure, cell, _ in rows(ALONE, 2, DEFAULT, 3)}
    assert table["tokenizer and compiler setup, once"] == "llguidance 500 ms; xgrammar 2000 ms"
    assert table["compile a schema into a matcher, median / max over 3"] == (
        "llguidance 2.0 / 9.0 ms; xgrammar 8.0 / 36.0 ms"
    )
    one_thread = next(cell for measure, cell in table.items() if measure.endswith("1 thread"))
    # median of 1..100 is 50.5, p99 interpolates 99.01
    assert one_thread == (
        "llguidance 50 / 99 µs; xgrammar 202 / 396 µs; "
        "llguidance's mask by xgrammar's kernel 101 / 198 µs"
    )
    two_threads = next(cell for measure, cell in table.items() if "on 2 threads" in measure)
    assert two_threads.startswith("llguidance 505 / 990 µs; xgrammar 202 / 396 µs")
    assert table["tokens decoded"] == "; ".join(f"{name} 100" for name in DRIVERS)
    outcomes = next(cell for measure, cell in table.items() if measure.startswith("outputs"))
    assert outcomes == "llguidance 3/3, 3 valid; xgrammar 3/3, 2 valid"


def test_times_says_faster_or_slower() -> None:
    assert times(1.0, 4.6) == "4.6x faster"
    assert times(2.0, 2.0) == "1.0x faster"
    assert times(25.0, 1.0) == "25.0x slower"


def test_verdict_compares_with_xgrammar_from_the_medians() -> None:
    assert verdict(ALONE, 2, DEFAULT, 3) == (
        "In this run, against xgrammar, llguidance compiled a schema 4.0x faster and masked a "
        "row 4.0x faster with torch on 1 thread, 2.5x slower on 2 (1.5x slower with xgrammar's "
        "kernel applying its mask); valid outputs: llguidance 3/3, xgrammar 2/3."
    )
