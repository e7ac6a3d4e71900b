"""bench/guidellm.py: guidellm's JSON report read right, failed requests refused, our own figures
computed as guidellm computes its own, and the rows comparing them.

The fixtures are real guidellm 0.8.1 reports written against our backend on this machine
(`tests/fixtures/guidellm-*.json`, each saying in its `_fixture` key which run wrote it), cut
to the fields the bench reads.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest

from bench.guidellm import (
    TARGET,
    Benchmark,
    Figures,
    GuideLLMError,
    best,
    comparison_rows,
    figures,
    parse_report,
)
from bench.load import Reply

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> dict[str, Any]:
    return dict(json.loads((FIXTURES / f"guidellm-{name}.json").read_text()))


@pytest.mark.parametrize(
    ("streams", "requests", "turns"),
    [(1, 3, 1), (8, 8, 1), (2, 8, 4)],  # one stream, a burst, guidellm's multi-turn mode
    ids=["1-stream", "8-streams", "multi-turn"],
)
def test_a_report_gives_guidellms_own_aggregates(streams: int, requests: int, turns: int) -> None:
    report = fixture(f"{streams}-streams")
    [raw] = report["benchmarks"]
    done = raw["requests"]["successful"]
    assert len({r["info"]["turn_index"] for r in done}) == turns  # the fixture is what it says
    metrics = raw["metrics"]
    assert parse_report(report) == (
        "0.8.1",
        [
            Benchmark(
                streams,
                requests,
                Figures(
                    rate=metrics["output_tokens_per_second"]["successful"]["mean"],
                    ttft_s=metrics["time_to_first_token_ms"]["successful"]["median"] / 1000,
                    itl_s=metrics["inter_token_latency_ms"]["successful"]["median"] / 1000,
                    prompt_tokens=max(r["prompt_tokens"] for r in done),
                ),
            )
        ],
    )


def test_failed_requests_are_an_error_with_the_first_reason() -> None:
    # guidellm sent a field our API refuses: it exits 0 and reports every request errored.
    with pytest.raises(GuideLLMError, match=r"2 requests failed.*400 Bad Request"):
        parse_report(fixture("errors"))


def reply(tokens: int, sent: float, chunk_times: list[float]) -> Reply:
    return Reply(tokens, chunk_times[0] - sent, chunk_times, prompt_tokens=41)


def test_our_figures_are_computed_as_guidellms() -> None:
    # 11 tokens in 3 chunks (the backend coalesces): the latency spreads over tokens, not chunks.
    replies = [reply(11, 0.0, [0.5, 1.0, 1.5]), reply(11, 0.0, [0.1, 0.6, 2.1])]
    assert figures(replies, seconds=2.2) == Figures(
        rate=22 / 2.2,
        ttft_s=statistics.median([0.5, 0.1]),
        itl_s=statistics.median([1.0 / 10, 2.0 / 10]),
        prompt_tokens=41,
    )


FAST = Figures(rate=100.0, ttft_s=0.060, itl_s=0.0100, prompt_tokens=41)
SLOW = Figures(rate=80.0, ttft_s=0.040, itl_s=0.0125, prompt_tokens=41)


def test_each_figures_best_run_counts() -> None:
    assert best([SLOW, FAST]) == Figures(rate=100.0, ttft_s=0.040, itl_s=0.0100, prompt_tokens=41)


def test_rows_give_each_ratio_and_our_runs_spread() -> None:
    theirs = [Figures(rate=90.0, ttft_s=0.050, itl_s=0.0100, prompt_tokens=41)]
    shape = "1 stream (longest prompt 41 / 41 tokens)"
    assert comparison_rows("1 stream", theirs, [FAST, SLOW]) == [
        (f"{shape}: output rate, guidellm / ours", "90 tok/s / 100 tok/s: 0.90 (0.80)", TARGET),
        (f"{shape}: TTFT median, guidellm / ours", "50 ms / 40 ms: 1.25 (0.67)", TARGET),
        (
            f"{shape}: inter-token latency median, guidellm / ours",
            "10.0 ms / 10.0 ms: 1.00 (1.25)",
            TARGET,
        ),
    ]
