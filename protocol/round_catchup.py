"""Catching up on a round this validator did not see (specs/Head.tla, AdoptByQuorum).

Since issue 11 finding 2 a party co-signs a RoundResult only if it matches its own
view of the round (protocol/head_rules.round_result_problem). A validator that was
down for the whole round (SIGKILLed and restarted) has no view and could never get
one: validators re-send their RoundFinal only until the round's final deadline, and a
multi-signed head confirms nothing without every party, so one restart halted
settlement for good.

The rule: a validator with no view of round r adopts r's outcome as its view when it
holds RoundFinal messages for r with identical content (round id, base adapter,
adapter, aggregate, contributors) from a strict majority of the head's parties
(quorum = n // 2 + 1 of n parties), counting each sender once and never itself;
RoundAborted messages from such a majority make the view "aborted" (whatever their
reasons: the view of an aborted round carries none). The trust trade-off
(docs/security.md, finding 2): a strict majority of validators can make a party that
did not see a round co-sign their account of it; one malicious validator alone
never can, and a party that saw the round itself still judges only against its own
view. A two-validator head can therefore never catch up (the one other party is no
majority).

Getting the messages there (node/roles/rounds.py carries it out): after a round's
final deadline, while the head has not confirmed it, each validator that ended the
round re-publishes its RoundFinal (or RoundAborted) every REPUBLISH_MS. A request
message would cost nothing while nobody lags, but it is one more signed message to
decode, rate-limit and answer; re-publishing needs none of that, also reaches a
lagging author (who has no record to ask about), and costs at most one message per
round per REPUBLISH_MS per validator, for rounds still kept (keep_rounds) that the
head has not confirmed: normally none, since a head confirms a round seconds after
its RoundFinal, well before the final deadline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection

from protocol import head as h
from protocol.aggregation_messages import RoundAborted, RoundFinal
from protocol.errors import RemoteProtocolError

REPUBLISH_MS = 15_000
MAX_ROUNDS_HEARD = 16  # rounds whose outcomes a lagging validator collects at once


@dataclass(frozen=True)
class RoundOutcome:
    """What a RoundFinal (or RoundAborted) says of a round: what must be identical."""

    round_id: int
    aborted: bool
    base_adapter_id: str = ""
    adapter_id: str = ""
    aggregate_id: str = ""
    contributors: tuple[str, ...] = ()


def outcome_of(message: RoundFinal | RoundAborted) -> RoundOutcome:
    if isinstance(message, RoundAborted):
        return RoundOutcome(message.round_id, True)
    return RoundOutcome(message.round_id, False, message.base_adapter_id, message.adapter_id,
                        message.aggregate_id, tuple(message.contributors))


def catchup_quorum(parties: int) -> int:
    """A strict majority of the head's parties."""
    return parties // 2 + 1


def adopted_outcome(round_id: int, heard: dict[str, RoundOutcome], *, parties: Collection[str],
                    me: str) -> RoundOutcome | None:
    """Round `round_id`'s outcome if a strict majority of `parties` other than `me` said
    exactly it (heard: sender -> the outcome it sent); else None."""
    members = set(parties)
    counts: dict[RoundOutcome, int] = {}
    for sender, outcome in heard.items():
        if sender in members and sender != me and outcome.round_id == round_id:
            counts[outcome] = counts.get(outcome, 0) + 1
    quorum = catchup_quorum(len(members))
    agreed = [outcome for outcome, count in counts.items() if count >= quorum]
    return agreed[0] if len(agreed) == 1 else None


class OutcomesHeard:
    """The outcomes a validator without a view heard, per round: the first one of each
    sender counts (a sender that changes its story gains nothing), only parties' count,
    and at most MAX_ROUNDS_HEARD rounds are kept (the newest)."""

    def __init__(self, parties: Collection[str], me: str) -> None:
        self.parties = frozenset(parties)
        self.me = me
        self.heard: dict[int, dict[str, RoundOutcome]] = {}

    def hear(self, sender: str, message: RoundFinal | RoundAborted) -> RoundOutcome | None:
        """Keep what `sender` said; the round's adopted outcome once there is one."""
        if sender not in self.parties or sender == self.me:
            return None
        round_id = message.round_id
        self.heard.setdefault(round_id, {}).setdefault(sender, outcome_of(message))
        while len(self.heard) > MAX_ROUNDS_HEARD:
            del self.heard[min(self.heard)]
        return adopted_outcome(round_id, self.heard.get(round_id, {}), parties=self.parties, me=self.me)

    def forget(self, round_id: int) -> None:
        self.heard.pop(round_id, None)


def republish_due(*, now_ms: int, final_deadline_ms: int, confirmed: bool | None, last_ms: int | None) -> bool:
    """Whether a validator that ended a round re-publishes its outcome now: after the
    final deadline (before it, the round machine's still_needed re-sends it every few
    seconds), while its head has not confirmed the round (confirmed None: no head that
    judges views, nothing to do), at most once per REPUBLISH_MS."""
    if confirmed is None or confirmed or now_ms < final_deadline_ms:
        return False
    return last_ms is None or now_ms - last_ms >= REPUBLISH_MS


def rounds_awaiting_view(machine: h.HeadMachine) -> set[int]:
    """The rounds of RoundResults this open head holds (pending, or in the snapshot
    request it waits to judge) that it has no view of and could still settle: the
    rounds whose outcomes this validator collects from others."""
    if machine.phase is not h.Phase.OPEN or machine.confirmed is None or machine.params is None:
        return set()
    raws = [raw for raw, _ in machine.pending.values()] + list(machine.waiting.txs if machine.waiting else [])
    ledger, wanted = machine.confirmed.ledger, set()
    for raw in raws:
        try:
            tx = h.decode_tx(raw)
        except RemoteProtocolError:
            continue
        if (isinstance(tx, h.RoundResult) and tx.round not in machine.observed_rounds
                and 0 <= tx.round < machine.params.round_limit and not round_confirmed(machine, tx.round)):
            wanted.add(tx.round)
    return wanted


def round_confirmed(machine: h.HeadMachine, round_id: int) -> bool:
    """Whether this head needs nothing more for round `round_id`: it settled it, or it
    can settle no round any more (closed, final), or never this one (out of range). A
    head not open yet will need it."""
    if machine.phase in (h.Phase.IDLE, h.Phase.INITIALIZING):
        return False
    if machine.phase is not h.Phase.OPEN or machine.confirmed is None or machine.params is None:
        return True
    ledger = machine.confirmed.ledger
    return (not 0 <= round_id < machine.params.round_limit or round_id < ledger.rounds_below
            or round_id in ledger.rounds_recent)


__all__ = ["MAX_ROUNDS_HEARD", "OutcomesHeard", "REPUBLISH_MS", "RoundOutcome", "adopted_outcome", "catchup_quorum",
           "outcome_of", "republish_due", "round_confirmed", "rounds_awaiting_view"]
