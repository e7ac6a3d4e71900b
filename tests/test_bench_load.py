"""bench/load.py: the mixed load's gap statistics, pooled over streams and cut to the window."""

from __future__ import annotations

import pytest

from bench.load import Gaps, Mixed, gap_stats


def test_gaps_are_pooled_over_streams_and_cut_to_the_window() -> None:
    streams = [
        [0.0, 1.0, 2.0, 3.0, 13.0, 14.0],  # a stall of 10 s across the window's start
        [4.0, 6.0, 7.0, 8.0],
        [20.0, 50.0],  # after the window: not counted
    ]
    gaps = gap_stats(streams, start=5.0, end=15.0)  # 10, 1 | 2, 1, 1
    assert (gaps.median, gaps.max) == (1.0, 10.0)  # the stall began before the window: it counts
    assert gap_stats(streams, start=0.0, end=60.0).max == 30.0
    assert gap_stats(streams[1:], start=0.0, end=5.0).median == 2.0  # (4, 6) ends after the end


def test_p99_is_the_tail_not_the_max() -> None:
    times = [float(t) for t in range(201)] + [300.0]  # 200 gaps of 1 s, then one of 100 s
    gaps = gap_stats([times], start=0.0, end=400.0)
    assert gaps.median == 1.0 and gaps.max == 100.0
    assert gaps.p99 < 10


def test_a_window_without_two_tokens_is_an_error() -> None:
    with pytest.raises(ValueError):
        gap_stats([[0.0, 1.0], [50.0]], start=10.0, end=20.0)


def test_spread_is_over_the_whole_run_and_stall_against_decoding_alone() -> None:
    alone, during = Gaps(0.025, 0.03, 0.03), Gaps(0.1, 0.15, 0.2)
    whole = Gaps(0.09, 0.15, 0.2)  # most of the run's gaps fall while the prompts arrive
    mixed = Mixed(alone, during, whole, arrival_ttfts=[1.0], arrival_tokens=10)
    assert mixed.spread == pytest.approx(0.2 / 0.09)
    assert mixed.stall == pytest.approx(0.2 / 0.025)
