"""The invariants of specs/Head.tla, each a function of one party's machine with the
spec's name."""

from __future__ import annotations

from typing import Callable

from protocol import head_rules as rules
from protocol.head._events import Phase
from protocol.head._machine import HeadMachine
from protocol.head._snapshot import snapshot_problem
from protocol.head._transactions import POOL, SlashVote, decode_tx, tx_id, tx_signing_payload


def TypeOK(m: HeadMachine) -> bool:
    if not isinstance(m.phase, Phase):
        return False
    if m.phase == Phase.IDLE:
        return m.params is None and not m.commits
    opened = m.phase not in (Phase.IDLE, Phase.INITIALIZING)
    if m.params is None or set(m.commits) - set(m.params.parties):
        return False
    if opened and m.payouts is None and (m.confirmed is None or set(m.commits) != set(m.params.parties)):
        return False
    if m.phase in (Phase.CLOSED, Phase.FANOUT_POSSIBLE) and m.closing is None:
        return False
    if m.phase in (Phase.INITIALIZING, Phase.OPEN) and m.closing is not None:
        return False
    return all(r.status in ("pending", "absorbed", "recovered") for r in m.deposits.values())


def ValueConserved(m: HeadMachine) -> bool:
    """Every ledger holds exactly what was committed plus what it absorbed, less what
    left it by Withdraw; fanout pays out the closed ledger plus all escrow."""
    ledgers = [s.ledger for s in (m.confirmed, m.closing and m.closing.snapshot) if s]
    if m.proposal is not None:
        ledgers.append(m.proposal.ledger)
    if m.confirmed is not None:
        ledgers.append(m.pending_ledger)
    if any(ledger.total + ledger.escrowed + ledger.withdrawn_total != m.committed_total + ledger.deposited
           for ledger in ledgers):
        return False
    if any(ledger.deposited - ledger.book.staked != sum(m.deposits[d].amount for d in ledger.deposits)
           for ledger in ledgers if all(d in m.deposits for d in ledger.deposits)):
        return False
    if m.phase == Phase.FINAL and m.payouts is not None:
        expected = (m.closing.snapshot.ledger.total + m.closing.snapshot.ledger.escrowed + m.escrow_total
                    if m.closing
                    else m.committed_total + m.escrow_total)
        return sum(m.payouts.values()) == expected
    return True


def OnlyFullySignedSnapshotCloses(m: HeadMachine) -> bool:
    if m.closing is None:
        return True
    return snapshot_problem(m.closing.snapshot, m.parameters, m._initial_ledger(), m.verify) is None


def ContestEndsOnNewestConfirmed(m: HeadMachine, newest_confirmed: int | None = None) -> bool:
    """Once the contestation period is over, the head settles on a snapshot at least as
    new as any confirmed one (this party's, or `newest_confirmed` across honest parties)."""
    if m.phase not in (Phase.FANOUT_POSSIBLE, Phase.FINAL) or m.closing is None:
        return True
    assert m.confirmed is not None
    bound = max(m.confirmed.number, newest_confirmed or 0)
    return m.closing.snapshot.number >= bound


def NoDoubleSpend(m: HeadMachine) -> bool:
    ledgers = [s.ledger for s in (m.confirmed, m.closing and m.closing.snapshot) if s]
    if m.confirmed is not None:
        ledgers.append(m.pending_ledger)
    for ledger in ledgers:
        if any(v < 0 for v in ledger.balances.values()) or any(
                v < 0 for v in ledger.withdrawn.values()):
            return False
        for seq in (ledger.applied, ledger.deposits):
            if len(set(seq)) != len(seq):
                return False
        for below, recent, settled in ((ledger.rounds_below, ledger.rounds_recent, ledger.rounds_settled),
                                       (ledger.epochs_below, ledger.epochs_recent, ledger.epochs_settled)):
            # A window names each settled id once, above its watermark, and counts no
            # more settlements than the ids it has passed or names.
            if list(recent) != sorted(set(recent)) or any(r < below for r in recent):
                return False
            if not len(recent) <= settled <= below + len(recent):
                return False
        if any(m.deposits.get(d) and m.deposits[d].status == "recovered" for d in ledger.deposits):
            return False
    return True


def SlashNeedsMajority(m: HeadMachine) -> bool:
    if m.params is None:
        return not m.votes
    for target in m.slashed():
        valid = set()
        for voter, (raw, sig) in m.votes[target].items():
            vote = decode_tx(raw)
            if (isinstance(vote, SlashVote) and vote.author == voter != target
                    and vote.target == target and voter in m.params.parties
                    and m.verify(voter, tx_signing_payload(m.params.head_id, tx_id(raw)), sig)):
                valid.add(voter)
        if len(valid) * 2 <= len(m.params.parties):
            return False
    return True


def RewardsOnlyByRule(m: HeadMachine) -> bool:
    """Every round and epoch a ledger settled happened (this party observed it itself) and
    is in the agreed range, and the pool paid out exactly what the reward rule gives them:
    no party can pay the pool to itself (issue 11, finding 2).

    A ledger names only the records of its window (issue 12). While no record was skipped
    and no view pruned, the settled ones are exactly range(below) plus the window, and
    the pool is checked to the unit; past that, the window's records are checked."""
    if m.params is None or m.confirmed is None:
        return True
    p = m.params
    initial_pool = sum(pool for _, _, pool in m.commits.values())
    for ledger in [s.ledger for s in (m.confirmed, m.closing and m.closing.snapshot) if s]:
        rounds, epochs = ledger.rounds_recent, ledger.epochs_recent
        if not all(0 <= r < p.round_limit and r in m.observed_rounds for r in rounds):
            return False
        if not all(0 <= e < p.epoch_limit and e in m.observed_epochs for e in epochs):
            return False
        exact = (m.views_pruned_rounds == m.views_pruned_epochs == 0
                 and ledger.rounds_settled == ledger.rounds_below + len(rounds)
                 and ledger.epochs_settled == ledger.epochs_below + len(epochs))
        if not exact:
            continue
        all_rounds = list(range(ledger.rounds_below)) + list(rounds)
        all_epochs = list(range(ledger.epochs_below)) + list(epochs)
        if not all(r in m.observed_rounds for r in all_rounds) or not all(
                e in m.observed_epochs for e in all_epochs):
            return False
        paid = sum(sum(rules.round_rewards(m.observed_rounds[r][1], p.round_reward).values())
                   for r in all_rounds)
        paid += sum(sum(rules.epoch_rewards(m.observed_epochs[e], p.epoch_reward).values())
                    for e in all_epochs)
        # penalties and slashed members' escrow go to the pool (protocol/member_book.py)
        if ledger.balances.get(POOL, 0) != initial_pool - paid + ledger.book.forfeited:
            return False
    return True


INVARIANTS: dict[str, Callable[[HeadMachine], bool]] = {
    "TypeOK": TypeOK,
    "ValueConserved": ValueConserved,
    "OnlyFullySignedSnapshotCloses": OnlyFullySignedSnapshotCloses,
    "ContestEndsOnNewestConfirmed": ContestEndsOnNewestConfirmed,
    "NoDoubleSpend": NoDoubleSpend,
    "SlashNeedsMajority": SlashNeedsMajority,
    "RewardsOnlyByRule": RewardsOnlyByRule,
}


def violated_invariants(m: HeadMachine) -> list[str]:
    return [name for name, check in INVARIANTS.items() if not check(m)]
