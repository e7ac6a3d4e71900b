"""The harness's waiting: it returns once a condition holds, and says why when it never does."""

from __future__ import annotations

import itertools

import pytest

from harness.services import wait_until


def test_waiting_ends_when_the_condition_holds() -> None:
    polls = itertools.count()
    wait_until(lambda: next(polls) == 3, 5)
    assert next(polls) == 4


def test_a_wait_that_times_out_says_the_state_it_ended_in() -> None:
    states = itertools.count()
    with pytest.raises(AssertionError, match=r"not met within 0\.2 s: state [1-9]\d*"):
        wait_until(lambda: False, 0.2, lambda: f"state {next(states) + 1}")
    assert next(states) == 1  # asked once, at the end


def test_a_plain_description_is_said_as_it_is() -> None:
    with pytest.raises(AssertionError, match=r"not met within 0\.1 s: two replicas"):
        wait_until(lambda: False, 0.1, "two replicas")
