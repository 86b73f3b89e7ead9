"""What a settled snapshot reports (records the node persists and pays out by) and
what fanout pays each party."""

from __future__ import annotations

from protocol import member_book as mb
from protocol.head._events import Effect, Record
from protocol.head._ledger import Ledger
from protocol.head._transactions import RoundResult, ScoreReport, Tx, Withdraw


def settled_records(tx: Tx, txid: str, number: int) -> list[Effect]:
    if isinstance(tx, mb.MEMBER_TXS):
        return [Record(kind, {**data, "author": tx.author, "tx_id": txid})
                for kind, data in mb.settled_records(tx, None, number)]
    if isinstance(tx, RoundResult):
        return [Record("round_result", {"round": tx.round, "adapter_id": tx.adapter_id,
                                        "contributors": list(tx.contributors),
                                        "rewards": dict(tx.rewards), "author": tx.author,
                                        "tx_id": txid, "snapshot": number})]
    if isinstance(tx, ScoreReport):
        return [Record("score_report", {"epoch": tx.epoch, "scores": dict(tx.scores),
                                        "rewards": dict(tx.rewards), "author": tx.author,
                                        "tx_id": txid, "snapshot": number})]
    if isinstance(tx, Withdraw):
        # What the node pays out: the amount left the head's ledger with this snapshot.
        return [Record("withdrawn", {"party": tx.author, "amount": tx.amount,
                                     "withdrawn_total": tx.withdrawn_before + tx.amount,
                                     "tx_id": txid, "snapshot": number})]
    return []


def final_payouts(ledger: Ledger, escrows: dict[str, int], slashed: list[str]) -> dict[str, int]:
    """Fanout: the closed ledger's balances, plus escrow back to every unslashed party.

    A slashed party's escrow is split evenly among the unslashed parties; the integer
    remainder goes one unit each to the first of them in hotkey order.
    """
    payouts = {who: amount for who, amount in ledger.balances.items() if amount}
    for member, entry in ledger.book.members.items():  # admitted members' stake goes back to them
        payouts[member] = payouts.get(member, 0) + entry.stake
    keepers = sorted(p for p in escrows if p not in slashed) or sorted(escrows)
    forfeited = sum(escrows[p] for p in escrows if p not in keepers)
    share, remainder = divmod(forfeited, len(keepers))
    for i, party in enumerate(keepers):
        bonus = share + (1 if i < remainder else 0)
        payouts[party] = payouts.get(party, 0) + escrows[party] + bonus
    return {k: v for k, v in sorted(payouts.items()) if v}
