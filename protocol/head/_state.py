"""What a head machine holds besides its ledger: the snapshot in flight, the deposits,
the closing; and all of its state as plain data for storage (to_wire/from_wire)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from protocol.head._events import Phase
from protocol.head._ledger import Ledger
from protocol.head._parameters import HeadParameters
from protocol.head._snapshot import Snapshot, snapshot_signing_payload
from protocol.head._transactions import tx_id
from protocol.head_messages import HeadReqSn


@dataclass
class Proposal:
    """The snapshot in flight: requested by its leader, collecting AckSn signatures."""

    number: int
    txs: tuple[tuple[bytes, bytes], ...]  # (canonical tx, author's signature), in order
    deposit_id: str
    ledger: Ledger
    requested_at_ms: int
    acks: dict[str, bytes] = field(default_factory=dict)

    @property
    def tx_ids(self) -> tuple[str, ...]:
        return tuple(tx_id(raw) for raw, _ in self.txs)

    def payload(self, head_id: str) -> bytes:
        return snapshot_signing_payload(head_id, self.number, self.tx_ids, self.deposit_id,
                                        self.ledger.hash())

    def request(self, head_id: str) -> HeadReqSn:
        return HeadReqSn(head_id, self.number, [raw for raw, _ in self.txs],
                         [sig for _, sig in self.txs], self.deposit_id, self.ledger.hash())


@dataclass
class DepositRecord:
    party: str
    amount: int
    last_snapshot: int  # the newest snapshot number that may absorb it
    status: str = "pending"  # pending | absorbed | recovered

    def includable_in(self, number: int) -> bool:
        """The inclusion rule, the same at every party: snapshot numbers, no clocks."""
        return self.status == "pending" and number <= self.last_snapshot


@dataclass
class Closing:
    snapshot: Snapshot  # the newest fully signed snapshot seen in Close/Contest
    closed_at_ms: int
    closer: str

    def deadline(self, parameters: HeadParameters) -> int:
        return self.closed_at_ms + parameters.contestation_period_ms


def state_to_wire(m: Any) -> dict[str, Any]:
    """All of a HeadMachine's state, as plain msgpack-able data: what storage keeps and
    what tests hash."""
    p = m.proposal
    c = m.closing
    return {
        "phase": m.phase.value,
        "params": None if m.params is None else params_to_wire(m.params),
        "commits": {k: list(v) for k, v in m.commits.items()},
        "confirmed": None if m.confirmed is None else m.confirmed.to_wire(),
        "pending": [[k, raw, sig] for k, (raw, sig) in m.pending.items()],
        "proposal": None if p is None else [p.number, [list(t) for t in p.txs], p.deposit_id,
                                            p.ledger.to_wire(), p.requested_at_ms, dict(p.acks)],
        "waiting": None if m.waiting is None else [
            m.waiting.number, list(m.waiting.txs), list(m.waiting.signatures),
            m.waiting.deposit_id, m.waiting.ledger_hash],
        "early_acks": dict(m.early_acks),
        "refusals": {p: list(r) for p, r in sorted(m.refusals.items())},
        "deposits": [[k, r.party, r.amount, r.last_snapshot, r.status]
                     for k, r in m.deposits.items()],
        "closing": None if c is None else [c.snapshot.to_wire(), c.closed_at_ms, c.closer],
        "votes": {t: {v: list(x) for v, x in sorted(vs.items())}
                  for t, vs in sorted(m.votes.items())},
        "payouts": m.payouts,
        "early": [list(e) for e in m.early],
        "observed_rounds": [[r, v] for r, v in sorted(m.observed_rounds.items())],
        "observed_epochs": [[e, v] for e, v in sorted(m.observed_epochs.items())],
        "views_pruned": [m.views_pruned_rounds, m.views_pruned_epochs],
    }


def restore_state(m: Any, wire: dict[str, Any]) -> None:
    """Load `state_to_wire`'s data into a fresh HeadMachine `m` (its derived pending
    ledger is the machine's to rebuild)."""
    m.phase = Phase(wire["phase"])
    if wire["params"] is not None:
        w = dict(wire["params"])
        w["parties"] = tuple(w["parties"])
        m.params = HeadParameters(**w)
    m.commits = {k: tuple(v) for k, v in wire["commits"].items()}  # type: ignore[misc]
    if wire["confirmed"] is not None:
        m.confirmed = Snapshot.from_wire(wire["confirmed"])
    m.pending = {k: (raw, sig) for k, raw, sig in wire["pending"]}
    if wire["proposal"] is not None:
        n, txs, dep, ledger, at, acks = wire["proposal"]
        m.proposal = Proposal(n, tuple((raw, sig) for raw, sig in txs), dep,
                              Ledger.from_wire(ledger), at, dict(acks))
    if wire["waiting"] is not None:
        n, txs, sigs, dep, lh = wire["waiting"]
        m.waiting = HeadReqSn(m.parameters.head_id, n, list(txs), list(sigs), dep, lh)
    m.early_acks = dict(wire["early_acks"])
    m.refusals = {p: (r[0], r[1], r[2]) for p, r in wire.get("refusals", {}).items()}
    m.deposits = {k: DepositRecord(p, a, d, s) for k, p, a, d, s in wire["deposits"]}
    if wire["closing"] is not None:
        snap, at, closer = wire["closing"]
        m.closing = Closing(Snapshot.from_wire(snap), at, closer)
    m.votes = {t: {v: (x[0], x[1]) for v, x in vs.items()} for t, vs in wire["votes"].items()}
    m.payouts = None if wire["payouts"] is None else dict(wire["payouts"])
    m.early = [(sender, raw) for sender, raw in wire["early"]]
    m.observed_rounds = {r: list(v) for r, v in wire.get("observed_rounds", [])}
    m.observed_epochs = {e: dict(v) for e, v in wire.get("observed_epochs", [])}
    m.views_pruned_rounds, m.views_pruned_epochs = wire.get("views_pruned", [0, 0])


def params_to_wire(params: HeadParameters) -> dict[str, Any]:
    return {f.name: (list(getattr(params, f.name)) if f.name == "parties" else getattr(params, f.name))
            for f in fields(params)}
