"""The settlement head's record rules as plain functions (specs/Head.tla, docs/settlement.md).

Who may author a RoundResult or ScoreReport, which ids may be settled, and what each
one pays are decided here, from the head's agreed parameters and the party's own view
of the round or epoch. protocol/head/ asks these functions before it co-signs; the
node uses the same reward functions to author, so author and co-signers compute alike.

Issue 11, finding 2: without these rules one party could author results for rounds
that never happened (ids 10^9, 10^9+1) paying itself, drain the pool, and then close
early unslashed. Now a party co-signs a record only if the scheduled author wrote it,
its id is in the agreed range, its contents equal the party's own RoundFinal (or epoch
scores) and its rewards equal the rule.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

# A record we cannot judge yet: our own RoundFinal (or epoch scores) has not come. It is
# the one problem that may go away, so a request that has it waits instead of failing.
NOT_OBSERVED = ("round_not_observed", "epoch_not_observed")


def split_reward(total: int, weights: Mapping[str, float]) -> dict[str, int]:
    """`total` split in proportion to positive weights; the integer remainder goes one unit
    each to the largest weights (ties by hotkey), so the shares always sum to `total`."""
    positive = {k: float(w) for k, w in weights.items() if w > 0}
    if not positive or total <= 0:
        return {}
    mass = sum(positive.values())
    shares = {k: int(total * w // mass) for k, w in positive.items()}
    order = sorted(positive, key=lambda k: (-positive[k], k))
    for i in range(total - sum(shares.values())):
        shares[order[i % len(order)]] += 1
    return {k: v for k, v in sorted(shares.items()) if v > 0}


def round_rewards(contributors: Sequence[str], round_reward: int) -> dict[str, int]:
    """A round pays `round_reward` in equal shares to its accepted contributors."""
    return split_reward(round_reward, {who: 1.0 for who in contributors})


def epoch_rewards(scores: Mapping[str, float], epoch_reward: int) -> dict[str, int]:
    """An epoch pays `epoch_reward` to its miners in proportion to their scores."""
    return split_reward(epoch_reward, scores)


def scheduled_author(parties: Sequence[str]) -> str:
    """Who authors every RoundResult and ScoreReport: rank 0, the lowest hotkey (the
    validator that also opens the rounds), so records never race each other."""
    return sorted(parties)[0]


def round_view(adapter_id: str, contributors: Sequence[str]) -> list[Any]:
    """What a party knows of a finished round from its own RoundFinal: the comparable form."""
    return [adapter_id, sorted(contributors)]


def round_result_problem(tx: Any, parameters: Any, observed: Mapping[int, list[Any]]
                         ) -> tuple[str, str] | None:
    """Why this party must not co-sign RoundResult `tx`; None when it may.

    `observed` maps round id -> round_view of this party's own RoundFinal.
    """
    if not 0 <= tx.round < parameters.round_limit:
        return ("round_out_of_range", f"round {tx.round} is outside the agreed rounds "
                f"0..{parameters.round_limit - 1}")
    author = scheduled_author(parameters.parties)
    if tx.author != author:
        return ("not_scheduled_author", f"round results are authored by {author}, not {tx.author}")
    if tx.contributors != sorted(set(tx.contributors)):
        return ("malformed_round_result", "contributors are sorted hotkeys without repeats")
    if tx.rewards != round_rewards(tx.contributors, parameters.round_reward):
        return ("rewards_not_by_rule", f"round {tx.round} must pay {parameters.round_reward} "
                "in equal shares to its contributors")
    own = observed.get(tx.round)
    if own is None:
        return ("round_not_observed", f"this party has no RoundFinal of round {tx.round} yet")
    if own != round_view(tx.adapter_id, tx.contributors):
        return ("round_mismatch", f"round {tx.round}'s adapter or contributors differ from "
                "this party's own RoundFinal")
    return None


def score_report_problem(tx: Any, parameters: Any, observed: Mapping[int, dict[str, float]]
                         ) -> tuple[str, str] | None:
    """Why this party must not co-sign ScoreReport `tx`; None when it may.

    `observed` maps epoch -> this party's own scores of that epoch's miners.
    """
    if not 0 <= tx.epoch < parameters.epoch_limit:
        return ("epoch_out_of_range", f"epoch {tx.epoch} is outside the agreed epochs "
                f"0..{parameters.epoch_limit - 1}")
    author = scheduled_author(parameters.parties)
    if tx.author != author:
        return ("not_scheduled_author", f"score reports are authored by {author}, not {tx.author}")
    if tx.rewards != epoch_rewards(tx.scores, parameters.epoch_reward):
        return ("rewards_not_by_rule", f"epoch {tx.epoch} must pay {parameters.epoch_reward} "
                "in proportion to the scores")
    own = observed.get(tx.epoch)
    if own is None:
        return ("epoch_not_observed", f"this party has no scores of epoch {tx.epoch} yet")
    if dict(own) != dict(tx.scores):
        return ("scores_mismatch", f"epoch {tx.epoch}'s scores differ from this party's own")
    return None


# --- the settled-record window (issue 12: storage per event must not grow with history) ---
#
# A ledger does not keep every settled round (or epoch) id. It keeps a watermark `below`
# (every id under it is settled or skipped for good) and the settled ids at or above it,
# all inside [below, below + RECORD_WINDOW). Records may settle out of order inside the
# window; one older than the window is refused, so a replayed old result never pays twice.
RECORD_WINDOW = 64
# The round_limit (and epoch_limit) of a head that runs until it is stopped (settings
# rounds = 0): far above any id a mesh reaches, and below msgpack's signed 64-bit range.
OPEN_ENDED = 2**62


def window_problem(below: int, recent: Sequence[int], number: int, what: str
                   ) -> tuple[str, str] | None:
    """Why `number` cannot settle in a window (below, recent); None when it can."""
    if number < below:
        return (f"{what}_too_old", f"{what} {number} is older than the settled window, which "
                f"starts at {below}: it was settled or skipped for good")
    if number in recent:
        return (f"{what}_already_recorded", f"{what} {number} is already settled")
    return None


def settle_in_window(below: int, recent: Sequence[int], number: int,
                     window: int = RECORD_WINDOW) -> tuple[int, tuple[int, ...]]:
    """The window after settling `number` (window_problem must be None): the watermark
    moves past a contiguous settled prefix, and jumps (skipping for good the ids it passes)
    when `number` is `window` or more ahead of it, so at most `window` ids are ever kept."""
    kept = set(recent) | {number}
    below = max(below, number - window + 1)
    while below in kept:
        below += 1
    return below, tuple(sorted(r for r in kept if r >= below))


def settled_agreed_rounds(rounds: Sequence[int], round_limit: int) -> int:
    """The rounds that count toward the agreed count before a close: only ids in the agreed
    range, so no record of a round that cannot have happened makes a close look due."""
    return sum(1 for r in set(rounds) if 0 <= r < round_limit)


__all__ = [
    "NOT_OBSERVED", "OPEN_ENDED", "RECORD_WINDOW", "epoch_rewards", "round_result_problem", "round_rewards", "round_view",
    "scheduled_author", "score_report_problem", "settle_in_window", "settled_agreed_rounds",
    "split_reward", "window_problem",
]
