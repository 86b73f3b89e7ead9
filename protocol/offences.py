"""Which trainer a round proved to have misbehaved, and whether a MemberSlash rests on
it (issue 15: punishment for sabotage; specs/Membership.tla NameOffender and Slash).

A validator's own round state names an offender only on grounds that every honest
validator reaches alike from the same bytes:
- its contribution was rejected for a reason its content-addressed blob proves on its
  own (a range proof that does not verify, a malformed or wrongly sized contribution),
  never for `unavailable` (a fetch fails for network reasons);
- the blame step after a slot overflow found its slot proof out of range
  (slot_out_of_range), never for staying silent (no_slot_proof: a crash looks the same).
Both are `invalid_contribution`. Nothing a round does names `sabotage` or
`withheld_share` yet, so no validator co-signs a slash on those grounds.

Every validator keeps its own OffenceViews (round -> the offenders it named), and co-signs
a MemberSlash only if its own view of the record's round names the same hotkey on the
same grounds (slash_evidence_problem, from member_book.record_problem). A validator that
has not finished the round yet waits for its view (round_not_observed, as for a
RoundResult); one whose round named nobody refuses (no_offence_evidence).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from protocol.aggregation import NAMED_OUT_OF_RANGE

Refusal = tuple[str, str]

# InvalidContribution reasons (crypto/contribution.py) that the blob's own bytes prove.
PROVEN_REJECTIONS = frozenset({"bad_proof", "malformed_contribution", "wrong_size"})
PROVEN_BLAME = frozenset({NAMED_OUT_OF_RANGE})
VIEWS_KEPT = 256  # rounds of views held; a slash names a recent round (the record window)


def named_offenders(rejected: Iterable[tuple[str, str]], bad_contributors: Mapping[str, str]) -> dict[str, str]:
    """hotkey -> grounds, from one finished round of this validator: `rejected` as
    (trainer, reason) of its excluded contributions, `bad_contributors` its blame step's."""
    named = {trainer: "invalid_contribution" for trainer, reason in rejected if reason in PROVEN_REJECTIONS}
    named.update({t: "invalid_contribution" for t, why in bad_contributors.items() if why in PROVEN_BLAME})
    return dict(sorted(named.items()))


class OffenceViews:
    """This validator's own view, per finished round, of whom it named (possibly nobody).

    Not part of the head machine's state: the node feeds it when a round ends (before
    the head hears the round, so a slash waiting for it is judged again then) and keeps
    it in its data dir. Bounded: the newest VIEWS_KEPT rounds."""

    def __init__(self, rounds: Mapping[int, Mapping[str, str]] | None = None) -> None:
        self.rounds: dict[int, dict[str, str]] = {int(r): dict(v) for r, v in (rounds or {}).items()}

    def observe(self, round_id: int, named: Mapping[str, str]) -> bool:
        """Keep this round's view; False if it was kept already (a round ends once)."""
        if round_id in self.rounds:
            return False
        self.rounds[round_id] = dict(sorted(named.items()))
        for old in sorted(self.rounds)[:-VIEWS_KEPT]:
            del self.rounds[old]
        return True

    def to_wire(self) -> dict[str, Any]:
        return {str(r): v for r, v in sorted(self.rounds.items())}

    @classmethod
    def from_wire(cls, wire: Any) -> "OffenceViews":
        if not isinstance(wire, dict) or not all(
                isinstance(r, str) and r.isdigit() and isinstance(v, dict)
                and all(isinstance(k, str) and isinstance(g, str) for k, g in v.items())
                for r, v in wire.items()):
            raise ValueError("offence views are {round: {hotkey: grounds}}")
        return cls({int(r): v for r, v in wire.items()})


def slash_evidence_problem(target: str, grounds: str, round_id: int, views: OffenceViews | None) -> Refusal | None:
    """Why this validator would not co-sign a slash of `target` on `grounds` for `round_id`."""
    if views is None:
        return ("no_offence_views", "this party keeps no round views; it co-signs no member slash")
    view = views.rounds.get(round_id)
    if view is None:
        # the head's waiting reason (protocol/head_rules.NOT_OBSERVED): judged again once our round ends
        return ("round_not_observed", f"round {round_id} has not ended here yet")
    if view.get(target) != grounds:
        named = f"named it for {view[target]}" if target in view else "did not name it"
        return ("no_offence_evidence", f"round {round_id} here {named}; the slash says {grounds}")
    return None


__all__ = ["OffenceViews", "PROVEN_BLAME", "PROVEN_REJECTIONS", "named_offenders", "slash_evidence_problem"]
