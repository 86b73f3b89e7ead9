"""Scoring rules against values computed by hand (the arithmetic is in each comment)."""

from __future__ import annotations

import math

import pytest

from protocol.errors import LocalProtocolError
from protocol.scoring import (
    WINDOW, Outcome, ScoringError, WindowEntry, failure_penalty, response_score, score_window, weights,
    weights_of,
)

OK, WRONG, TIMEOUT, ERROR = Outcome.OK, Outcome.WRONG, Outcome.TIMEOUT, Outcome.ERROR


def ok(latency_s: float) -> WindowEntry:
    return WindowEntry(OK, latency_s)


def test_response_score_is_pareto_in_time():
    assert response_score(40.0) == 1.0  # (40/40)^3 = 1
    assert response_score(20.0) == 8.0  # (40/20)^3 = 2^3 = 8
    assert response_score(80.0) == 0.125  # (40/80)^3 = 1/8
    assert response_score(10.0) == 64.0  # (40/10)^3 = 4^3 = 64
    assert response_score(4.0) == pytest.approx(1000.0)  # (40/4)^3 = 10^3
    assert response_score(1e-9) == response_score(1e-3) == pytest.approx(6.4e13)  # floor: (40/0.001)^3


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan, None, True])
def test_response_score_refuses_impossible_latency(bad):
    with pytest.raises(ScoringError) as info:
        response_score(bad)
    assert info.value.reason == "bad_latency"
    assert isinstance(info.value, LocalProtocolError)


def test_failure_penalty_only_above_twenty_percent():
    assert failure_penalty(8.0, 0.0) == 8.0
    assert failure_penalty(8.0, 0.20) == 8.0  # "exceeds 20 %": exactly 20 % is no penalty
    # 25 %: excess 0.05 -> 2.5^(0.05*100) = 2.5^5 = 97.65625; 8 / (1 + 97.65625) = 8 / 98.65625
    assert failure_penalty(8.0, 0.25) == pytest.approx(8.0 / 98.65625)
    # 30 %: 2.5^10 = 9536.7431640625; 1 / 9537.7431640625
    assert failure_penalty(1.0, 0.30) == pytest.approx(1.0 / 9537.7431640625)
    # 100 %: 2.5^80 ~ 1.4e31: still a number, never below zero
    assert 0.0 <= failure_penalty(1.0, 1.0) < 1e-30
    assert failure_penalty(0.0, 1.0) == 0.0


@pytest.mark.parametrize("rate", [-0.1, 1.5, math.nan])
def test_failure_penalty_refuses_rates_outside_unit_interval(rate):
    with pytest.raises(ScoringError) as info:
        failure_penalty(1.0, rate)
    assert info.value.reason == "bad_failure_rate"


def test_failure_penalty_refuses_infinite_score():
    with pytest.raises(ScoringError) as info:
        failure_penalty(math.inf, 0.0)
    assert info.value.reason == "bad_score"


def test_window_median_of_ok_scores_with_penalty():
    # 4 ok at 20, 40, 40, 80 s -> scores 8, 1, 1, 0.125 -> median = (1 + 1) / 2 = 1
    # plus 1 timeout: failure rate 1/5 = 0.20 -> not above the threshold: score 1
    window = [ok(20), ok(40), ok(40), ok(80), WindowEntry(TIMEOUT)]
    score = score_window("m", window)
    assert (score.challenges, score.ok, score.failure_rate) == (5, 4, 0.2)
    assert score.median_ok_score == 1.0 and score.score == 1.0
    assert score.median_latency_s == 40.0  # median of 20, 40, 40, 80


def test_window_failures_enter_only_through_the_rate():
    # 3 ok at 20 s (score 8 each, median 8) and 1 wrong: rate 1/4 = 0.25
    # score = 8 / (1 + 2.5^5) = 8 / 98.65625 = 0.081089...; the wrong one is not a zero in the median
    window = [ok(20), WindowEntry(WRONG), ok(20), ok(20)]
    score = score_window("m", window)
    assert score.median_ok_score == 8.0
    assert score.score == pytest.approx(8.0 / 98.65625)
    assert score.score == pytest.approx(0.0810896)


def test_window_counts_only_the_last_forty():
    # 10 errors, then 40 ok at 40 s: the errors fell out of the window -> rate 0, score 1
    window = [WindowEntry(ERROR)] * 10 + [ok(40)] * WINDOW
    score = score_window("m", window)
    assert (score.challenges, score.failure_rate, score.score) == (40, 0.0, 1.0)
    # one more error pushes out one ok: 39 ok + 1 error, rate 1/40 = 0.025 -> still 1
    assert score_window("m", window + [WindowEntry(ERROR)]).score == 1.0


def test_window_without_ok_scores_zero():
    assert score_window("m", []).score == 0.0
    nothing_ok = score_window("m", [WindowEntry(TIMEOUT), WindowEntry(ERROR)])
    assert (nothing_ok.score, nothing_ok.failure_rate, nothing_ok.median_latency_s) == (0.0, 1.0, None)


def test_window_entry_ok_needs_a_latency():
    with pytest.raises(ScoringError):
        WindowEntry(OK, None)
    with pytest.raises(ScoringError):
        WindowEntry(OK, -2.0)


def test_weights_normalize_and_survive_all_zero():
    # scores 8, 1, 1 -> sum 10 -> 0.8, 0.1, 0.1
    assert weights({"a": 8.0, "b": 1.0, "c": 1.0}) == pytest.approx({"a": 0.8, "b": 0.1, "c": 0.1})
    assert weights({"a": 0.0, "b": 0.0}) == {"a": 0.0, "b": 0.0}
    assert weights({}) == {}
    # from windows: a at 20 s (8), b at 40 s (1), c all timeouts (0) -> 8/9, 1/9, 0
    scores = [score_window("a", [ok(20)]), score_window("b", [ok(40)]),
              score_window("c", [WindowEntry(TIMEOUT)])]
    assert weights_of(scores) == pytest.approx({"a": 8 / 9, "b": 1 / 9, "c": 0.0})


@pytest.mark.parametrize("bad", [-1.0, math.inf, math.nan])
def test_weights_refuse_negative_or_non_finite(bad):
    with pytest.raises(ScoringError) as info:
        weights({"a": 1.0, "b": bad})
    assert info.value.reason == "bad_score"


def test_faster_miner_outweighs_even_with_some_failures():
    # fast: 10 ok at 10 s (64 each) + 2 errors: rate 2/12 = 0.1667 <= 0.2 -> 64
    # slow: 12 ok at 40 s -> 1.  weights 64/65, 1/65
    fast = score_window("fast", [ok(10)] * 10 + [WindowEntry(ERROR)] * 2)
    slow = score_window("slow", [ok(40)] * 12)
    assert weights_of([fast, slow]) == pytest.approx({"fast": 64 / 65, "slow": 1 / 65})
