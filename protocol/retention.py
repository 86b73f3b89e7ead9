"""Which rounds and blobs a node keeps when it trains for weeks (issue 12).

Every round leaves a state file, contributions (a few MB each), an aggregate, partial
decryptions, evidence and an adapter; kept forever, a mesh that runs a round a minute
grows by gigabytes a day. A node keeps the newest `keep` rounds and whatever they still
need, and forgets the rest. The rule is the same for validators and trainers, and pure,
so that it is tested alone:

- a round that has not ended is never dropped (it may still need every blob);
- the newest round that ended with an adapter is never dropped: its adapter is the base
  of the next round, and expected_base_adapter reads it from there;
- a blob is deleted only if no kept round still names it (as its own or as its base),
  and never a pinned one (the mesh's initial adapter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from protocol.aggregation import COOLDOWN_ROUNDS

MIN_KEEP_ROUNDS = COOLDOWN_ROUNDS + 1  # the blame cool-down reads the rounds just before


@dataclass(frozen=True)
class RoundRecord:
    """What retention needs to know of one round."""

    round_id: int
    ended: bool
    blobs: frozenset[str]  # the round's own (ValidatorRound/CommitteeRound/TrainerRound.blob_ids)
    base_adapter_id: str = ""  # the adapter it started from
    adapter_id: str = ""  # the adapter it ended with ("" unless final)


@dataclass(frozen=True)
class RetentionPlan:
    drop_rounds: tuple[int, ...]
    delete_blobs: frozenset[str]


def retention_plan(rounds: Iterable[RoundRecord], keep: int, pinned: Iterable[str] = ()) -> RetentionPlan:
    """The rounds to forget and the blobs to delete so that the newest `keep` rounds (at
    least MIN_KEEP_ROUNDS) and what they need remain."""
    keep = max(keep, MIN_KEEP_ROUNDS)
    ordered = sorted(rounds, key=lambda r: r.round_id)
    recent = {r.round_id for r in ordered[-keep:]}
    finals = [r.round_id for r in ordered if r.adapter_id]
    newest_final = finals[-1] if finals else None
    dropped = [r for r in ordered if r.ended and r.round_id not in recent and r.round_id != newest_final]
    dropped_ids = {r.round_id for r in dropped}
    needed = set(pinned)
    for r in ordered:
        if r.round_id not in dropped_ids:
            needed |= r.blobs | {r.base_adapter_id}
    deletable = set().union(*(r.blobs | {r.base_adapter_id} for r in dropped)) if dropped else set()
    return RetentionPlan(tuple(r.round_id for r in dropped), frozenset(i for i in deletable - needed if i))


__all__ = ["MIN_KEEP_ROUNDS", "RetentionPlan", "RoundRecord", "retention_plan"]
