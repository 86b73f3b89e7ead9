"""Scoring FHE challenge outcomes: plain functions, read against Brainlock's README.

Brainlock (subnet 55) scores one response by its time, Pareto-style:

    score = (SCALE_S / response_time_s) ** ALPHA          SCALE_S = 40 s, ALPHA = 3

and, when a miner's failure rate exceeds FAILURE_THRESHOLD (20 %), divides it by

    1 + PENALTY_BASE ** ((failure_rate - FAILURE_THRESHOLD) * 100)      PENALTY_BASE = 2.5

never going below 0. What the README leaves open is fixed here:

- a miner's window is its last WINDOW (40) recorded challenges, every outcome counted;
- failure rate = (wrong + timeout + error) / challenges in the window;
- failures enter only through that rate: they have no response time, so they carry no
  score of their own and are not zeros in the median;
- miner score = penalty(median of the ok challenges' scores, failure rate); a window
  with no ok challenge scores 0. Dividing by the penalty commutes with the median, so
  penalizing each ok score first would give the same number;
- weights are the miner scores divided by their sum; all zero gives all zero.
"""

from __future__ import annotations

import enum
import math
import statistics
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from protocol.errors import LocalProtocolError

SCALE_S = 40.0
ALPHA = 3.0
FAILURE_THRESHOLD = 0.20
PENALTY_BASE = 2.5
WINDOW = 40
MIN_LATENCY_S = 1e-3  # clock resolution floor: keeps (SCALE_S / t) ** ALPHA finite


class Outcome(str, enum.Enum):
    """What one challenge came to: exactly one of these is recorded per challenge."""

    OK = "ok"  # result decrypted, argmax agrees and cosine is high enough
    WRONG = "wrong"  # a result came back in time, but it is not the right one
    TIMEOUT = "timeout"  # no result before the deadline
    ERROR = "error"  # refused, broken stream, malformed or unverifiable result

    @property
    def failed(self) -> bool:
        return self is not Outcome.OK


class ScoringError(LocalProtocolError):
    """A scoring function got values the shell should never hand it."""

    def __init__(self, hint: str, *, reason: str) -> None:
        super().__init__(hint)
        self.reason = reason


@dataclass(frozen=True)
class WindowEntry:
    """One recorded challenge as scoring sees it: the outcome, and latency when ok."""

    outcome: Outcome
    latency_s: float | None = None

    def __post_init__(self) -> None:
        if self.outcome is Outcome.OK:
            _check_latency(self.latency_s)


@dataclass(frozen=True)
class MinerScore:
    miner: str
    challenges: int  # in the window
    ok: int
    failure_rate: float
    median_latency_s: float | None  # over ok challenges; None when there is none
    median_ok_score: float
    score: float


def _check_latency(latency_s: float | None) -> float:
    if (not isinstance(latency_s, (int, float)) or isinstance(latency_s, bool)
            or not math.isfinite(latency_s) or latency_s <= 0):
        raise ScoringError(f"latency must be a positive finite number of seconds, got {latency_s!r}",
                           reason="bad_latency")
    return float(latency_s)


def response_score(latency_s: float) -> float:
    """(SCALE_S / latency_s) ** ALPHA: 1.0 at 40 s, 8.0 at 20 s, 0.125 at 80 s.

    Latencies under MIN_LATENCY_S count as MIN_LATENCY_S: no real FHE inference is that
    fast, and an unbounded score would swallow every other miner's weight.
    """
    return (SCALE_S / max(MIN_LATENCY_S, _check_latency(latency_s))) ** ALPHA


def failure_penalty(score: float, failure_rate: float) -> float:
    """The score after Brainlock's failure penalty; never below 0."""
    if not math.isfinite(score):
        raise ScoringError(f"score must be finite, got {score!r}", reason="bad_score")
    if not (math.isfinite(failure_rate) and 0.0 <= failure_rate <= 1.0):
        raise ScoringError(f"failure rate must lie in [0, 1], got {failure_rate!r}",
                           reason="bad_failure_rate")
    if failure_rate > FAILURE_THRESHOLD:
        score = score / (1.0 + PENALTY_BASE ** ((failure_rate - FAILURE_THRESHOLD) * 100))
    return max(0.0, score)


def score_window(miner: str, window: Sequence[WindowEntry]) -> MinerScore:
    """A miner's score from its last WINDOW challenges (older entries are ignored)."""
    recent = list(window)[-WINDOW:]
    ok_latencies = [e.latency_s for e in recent if e.outcome is Outcome.OK]
    if not recent:
        return MinerScore(miner, 0, 0, 0.0, None, 0.0, 0.0)
    failure_rate = (len(recent) - len(ok_latencies)) / len(recent)
    if not ok_latencies:
        return MinerScore(miner, len(recent), 0, failure_rate, None, 0.0, 0.0)
    median_ok = statistics.median(response_score(t) for t in ok_latencies)  # type: ignore[arg-type]
    return MinerScore(
        miner=miner,
        challenges=len(recent),
        ok=len(ok_latencies),
        failure_rate=failure_rate,
        median_latency_s=statistics.median(ok_latencies),  # type: ignore[type-var]
        median_ok_score=median_ok,
        score=failure_penalty(median_ok, failure_rate),
    )


def weights(scores: Mapping[str, float]) -> dict[str, float]:
    """Scores normalized to sum 1; every weight 0 when every score is 0."""
    for miner, score in scores.items():
        if not math.isfinite(score) or score < 0:
            raise ScoringError(f"score of {miner} must be finite and >= 0, got {score!r}",
                               reason="bad_score")
    total = math.fsum(scores.values())
    if total == 0.0:
        return {miner: 0.0 for miner in scores}
    return {miner: score / total for miner, score in scores.items()}


def weights_of(miner_scores: Iterable[MinerScore]) -> dict[str, float]:
    return weights({s.miner: s.score for s in miner_scores})


__all__ = [
    "ALPHA", "FAILURE_THRESHOLD", "MIN_LATENCY_S", "MinerScore", "Outcome", "PENALTY_BASE", "SCALE_S", "ScoringError",
    "WINDOW", "WindowEntry", "failure_penalty", "response_score", "score_window", "weights", "weights_of",
]
