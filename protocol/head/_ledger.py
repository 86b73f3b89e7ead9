"""The head's ledger and the rules that change it: a transaction applied, a deposit
absorbed (pure functions; a refused change raises RemoteProtocolError with its reason)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Any

from protocol import head_rules as rules
from protocol import member_book as mb
from protocol.head._codec import canonical, conforms, sha256_hex
from protocol.head._errors import reject
from protocol.head._transactions import POOL, RoundResult, ScoreReport, Transfer, Tx, Withdraw


@dataclass(frozen=True)
class Ledger:
    """The head's off-chain state: balances, what left the head by Withdraw, and what was
    recorded, kept bounded so that a snapshot's size does not grow with the head's history
    (issue 12): settled rounds and epochs as a watermark plus a window (head_rules)."""

    balances: dict[str, int]
    # Ids of applied Transfers: the only kind that nothing else refuses a replay of (a
    # Transfer's nonce lets one payment be made twice). Records are refused by their
    # window, Withdraws by withdrawn_before; the node itself never sends a Transfer.
    applied: tuple[str, ...] = ()
    rounds_below: int = 0  # every round under it is settled or skipped for good
    rounds_recent: tuple[int, ...] = ()  # settled rounds >= rounds_below, sorted
    rounds_settled: int = 0  # how many RoundResults were settled, ever
    epochs_below: int = 0
    epochs_recent: tuple[int, ...] = ()
    epochs_settled: int = 0
    deposits: tuple[str, ...] = ()  # absorbed deposit ids
    deposited: int = 0  # value that entered after the head opened
    withdrawn: dict[str, int] = field(default_factory=dict)  # party -> value it took out, ever
    book: mb.MemberBook = mb.EMPTY_BOOK  # membership records and members' escrow (issue 15)

    @property
    def total(self) -> int:
        return sum(self.balances.values())

    @property
    def escrowed(self) -> int:
        """Admitted members' stake, held in the head outside the balances."""
        return self.book.escrowed

    @property
    def withdrawn_total(self) -> int:
        return sum(self.withdrawn.values())

    @property
    def rounds(self) -> tuple[int, ...]:
        """The settled rounds this ledger still names (those of its window)."""
        return self.rounds_recent

    @property
    def epochs(self) -> tuple[int, ...]:
        return self.epochs_recent

    def to_wire(self) -> dict[str, Any]:
        return {"balances": dict(self.balances), "applied": list(self.applied),
                "rounds": [self.rounds_below, list(self.rounds_recent), self.rounds_settled],
                "epochs": [self.epochs_below, list(self.epochs_recent), self.epochs_settled],
                "deposits": list(self.deposits), "deposited": self.deposited,
                "withdrawn": dict(self.withdrawn),
                # Only once there is a membership record: a ledger without one hashes as before.
                **({} if self.book.empty else {"members": self.book.to_wire()})}

    @classmethod
    def from_wire(cls, wire: Any) -> "Ledger":
        shape = {"balances": dict[str, int], "applied": list[str], "rounds": list,
                 "epochs": list, "deposits": list[str], "deposited": int,
                 "withdrawn": dict[str, int]}
        keys = set(wire) - {"members"} if isinstance(wire, dict) else set()
        if not isinstance(wire, dict) or keys != set(shape) or not all(
                conforms(wire[k], hint) for k, hint in shape.items()):
            raise reject("malformed_snapshot", f"a ledger has exactly the fields {sorted(shape)}")
        rounds, epochs = (_window_from_wire(wire[k], k) for k in ("rounds", "epochs"))
        book = mb.MemberBook.from_wire(wire["members"]) if "members" in wire else mb.EMPTY_BOOK
        return cls(dict(wire["balances"]), tuple(wire["applied"]), *rounds, *epochs,
                   tuple(wire["deposits"]), wire["deposited"], dict(wire["withdrawn"]), book)

    def hash(self) -> str:
        return self._hash

    @functools.cached_property
    def _hash(self) -> str:  # a frozen ledger hashes the same every time
        return sha256_hex(canonical(self.to_wire()))


def _window_from_wire(wire: Any, what: str) -> tuple[int, tuple[int, ...], int]:
    """[below, recent, settled]: recent sorted, inside [below, below + RECORD_WINDOW)."""
    ok = (isinstance(wire, list) and len(wire) == 3 and conforms(wire[0], int)
          and conforms(wire[1], list[int]) and conforms(wire[2], int))
    if ok:
        below, recent, settled = wire[0], tuple(wire[1]), wire[2]
        ok = (list(recent) == sorted(set(recent)) and settled >= len(recent)
              and all(below <= r < below + rules.RECORD_WINDOW for r in recent))
    if not ok:
        raise reject("malformed_snapshot", f"a ledger's {what} are [below, sorted recent ids "
                      f"within {rules.RECORD_WINDOW} of below, settled count]")
    return below, recent, settled


def apply_tx(ledger: Ledger, tx: Tx, txid: str) -> Ledger:
    """The ledger after `tx`, or RemoteProtocolError with the reason it cannot apply."""
    if isinstance(tx, mb.MEMBER_TXS):
        return mb.apply_member_tx(ledger, tx, POOL)
    balances = dict(ledger.balances)
    if isinstance(tx, RoundResult):
        problem = rules.window_problem(ledger.rounds_below, ledger.rounds_recent, tx.round, "round")
        if problem:
            raise reject(*problem)
        _pay_from_pool(balances, tx.rewards)
        below, recent = rules.settle_in_window(ledger.rounds_below, ledger.rounds_recent, tx.round)
        return replace(ledger, balances=balances, rounds_below=below, rounds_recent=recent,
                       rounds_settled=ledger.rounds_settled + 1)
    if isinstance(tx, ScoreReport):
        problem = rules.window_problem(ledger.epochs_below, ledger.epochs_recent, tx.epoch, "epoch")
        if problem:
            raise reject(*problem)
        _pay_from_pool(balances, tx.rewards)
        below, recent = rules.settle_in_window(ledger.epochs_below, ledger.epochs_recent, tx.epoch)
        return replace(ledger, balances=balances, epochs_below=below, epochs_recent=recent,
                       epochs_settled=ledger.epochs_settled + 1)
    if isinstance(tx, Transfer):
        if txid in ledger.applied:
            raise reject("duplicate_tx", f"transaction {txid[:12]} was already applied")
        _take(balances, tx.author, tx.amount, f"send {tx.amount}")
        balances[tx.recipient] = balances.get(tx.recipient, 0) + tx.amount
        return replace(ledger, balances=balances, applied=ledger.applied + (txid,))
    if isinstance(tx, Withdraw):
        before = ledger.withdrawn.get(tx.author, 0)
        if tx.withdrawn_before != before:
            raise reject("stale_withdraw", f"{tx.author} has withdrawn {before} so far, not "
                          f"{tx.withdrawn_before}: this withdraw was applied or overtaken")
        _take(balances, tx.author, tx.amount, f"withdraw {tx.amount}")
        return replace(ledger, balances=balances,
                       withdrawn={**ledger.withdrawn, tx.author: before + tx.amount})
    raise reject("not_a_ledger_tx", "slash votes act on escrow, not on the ledger")


def _take(balances: dict[str, int], who: str, amount: int, what: str) -> None:
    if balances.get(who, 0) < amount:
        raise reject("insufficient_funds", f"{who} holds {balances.get(who, 0)}, cannot {what}")
    balances[who] -= amount


def _pay_from_pool(balances: dict[str, int], rewards: dict[str, int]) -> None:
    total = sum(rewards.values())
    if balances.get(POOL, 0) < total:
        raise reject("insufficient_pool", f"rewards of {total} exceed the reward pool's "
                      f"{balances.get(POOL, 0)}")
    balances[POOL] -= total
    for who, amount in rewards.items():
        balances[who] = balances.get(who, 0) + amount


def apply_deposit(ledger: Ledger, deposit_id: str, party: str, amount: int) -> Ledger:
    if deposit_id in ledger.deposits:
        raise reject("duplicate_deposit", f"deposit {deposit_id[:12]} was already absorbed")
    balances = dict(ledger.balances)
    balances[party] = balances.get(party, 0) + amount
    return replace(ledger, balances=balances, deposits=ledger.deposits + (deposit_id,),
                   deposited=ledger.deposited + amount)
