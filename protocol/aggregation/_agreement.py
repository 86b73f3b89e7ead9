"""Accepted sets: the set a validator publishes, and the quorum that agrees on one."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Mapping

from protocol.aggregation._round_open import is_blob_id, quorum
from protocol.aggregation_messages import AcceptedSet, RoundOpen
from protocol.errors import RemoteProtocolError


@dataclass(frozen=True)
class SetView:
    """One AcceptedSet's content: what validators must publish identically to agree."""

    contributors: tuple[str, ...]
    blob_ids: tuple[str, ...]
    aggregate_id: str  # "" when below the minimum

    @classmethod
    def from_message(cls, msg: AcceptedSet, ro: RoundOpen) -> "SetView":
        def bad(why: str) -> RemoteProtocolError:
            return RemoteProtocolError(f"AcceptedSet of round {msg.round_id}: {why}", reason="bad_accepted_set")

        if len(msg.contributors) != len(msg.blob_ids):
            raise bad("one blob id per contributor")
        if len(msg.contributors) > ro.max_contributors:
            raise bad(f"more than max_contributors ({ro.max_contributors})")
        if any(a >= b for a, b in zip(msg.contributors, msg.contributors[1:])):
            raise bad("contributors must be sorted by hotkey, each once")
        if not all(is_blob_id(b) for b in msg.blob_ids) or len(set(msg.blob_ids)) != len(msg.blob_ids):
            raise bad("blob ids must be distinct sha256 hex ids")
        below = len(msg.contributors) < ro.min_contributors
        if below and msg.aggregate_id != "":
            raise bad("a set below min_contributors has no aggregate (aggregate_id must be empty)")
        if not below and not is_blob_id(msg.aggregate_id):
            raise bad("aggregate_id must be a sha256 hex id")
        return cls(tuple(msg.contributors), tuple(msg.blob_ids), msg.aggregate_id)

    def to_message(self, round_id: int) -> AcceptedSet:
        return AcceptedSet(round_id, list(self.contributors), list(self.blob_ids), self.aggregate_id)

    def to_state(self) -> list:
        return [list(self.contributors), list(self.blob_ids), self.aggregate_id]

    @classmethod
    def from_state(cls, raw: list) -> "SetView":
        return cls(tuple(raw[0]), tuple(raw[1]), raw[2])


class Agreement:
    """The AcceptedSets heard from the round's validators, one each."""

    def __init__(self, ro: RoundOpen, sets: Mapping[str, SetView] | None = None) -> None:
        self.ro = ro
        self.sets: dict[str, SetView] = dict(sets or {})

    def record(self, validator: str, view: SetView) -> bool:
        """True if new; a second, different set from one validator is equivocation."""
        if validator not in self.ro.validators:
            raise RemoteProtocolError(f"{validator} is not a validator of round {self.ro.round_id}",
                                      reason="not_a_round_validator")
        known = self.sets.get(validator)
        if known is not None:
            if known != view:
                raise RemoteProtocolError(f"{validator} published two different AcceptedSets",
                                          reason="equivocation")
            return False
        self.sets[validator] = view
        return True

    def agreed(self) -> SetView | None:
        counts = Counter(self.sets.values())
        for view, count in counts.items():
            if count >= quorum(self.ro):
                return view
        return None

    def impossible(self) -> bool:
        """No set can reach the quorum any more, even if every silent validator joins it."""
        silent = len(self.ro.validators) - len(self.sets)
        best = max(Counter(self.sets.values()).values(), default=0)
        return best + silent < quorum(self.ro)

    def to_state(self) -> dict:
        return {v: s.to_state() for v, s in sorted(self.sets.items())}
