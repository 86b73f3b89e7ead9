"""The membership records of the settlement head: who joined, left or was slashed, and
the stake each admitted member holds in escrow (issue 15; specs/Membership.tla).

The mesh's membership is the founding set (the genesis file) plus this book, which the
head's ledger carries: every record is in a snapshot that every validator signed, so
every node that holds the newest such snapshot has the same directory, without a
restart or a file edit.

Three transaction kinds, authored by a validator (a head party) and co-signed like
every other record:
- Admit: carries the joiner's own signed JoinRequest, whole; its stake enters the head
  into the member's escrow (the embedded head's deposit entry);
- Leave: carries the member's signed LeaveRequest; its escrow less `penalty` is
  released to it (the ledger's `withdrawn`, paid out by the node), the penalty goes to
  the reward pool;
- MemberSlash: the member's escrow goes to the reward pool, and the hotkey may not
  join again for the policy's cool-down. A party co-signs one only if its own view of
  the round it names (`evidence`) named the same member on the same grounds
  (protocol/offences.py).

The ledger rules here (apply_member_tx) are the same at every party; whether a party
co-signs a record at all is record_problem, the admission rules of protocol/admission.py
against the confirmed ledger. Value is conserved: admission adds `stake` to both what
entered the head and what is in escrow; leave and slash move escrow out or to the pool.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Union

from crypto.identity import verify_signature
from protocol.admission import (AdmissionPolicy, JoinRequest, LeaveRequest, admission_problem, leave_penalty,
                                leave_problem)
from protocol.epistula import Envelope, signing_payload
from protocol.errors import RemoteProtocolError
from protocol.membership import Member, Role
from protocol.offences import OffenceViews, slash_evidence_problem

MEMBER_SLASH_GROUNDS = ("invalid_contribution", "sabotage", "withheld_share")


def _reject(reason: str, hint: str) -> RemoteProtocolError:
    return RemoteProtocolError(hint, reason=reason)


# --- the records ------------------------------------------------------------------


@dataclass(frozen=True)
class Admit:
    KIND: ClassVar[str] = "member_admit"
    author: str
    request: bytes  # the joiner's JoinRequest, a signed gossip envelope


@dataclass(frozen=True)
class Leave:
    KIND: ClassVar[str] = "member_leave"
    author: str
    request: bytes  # the member's LeaveRequest, a signed gossip envelope
    penalty: int  # forfeited to the reward pool (protocol/admission.leave_penalty)


@dataclass(frozen=True)
class MemberSlash:
    KIND: ClassVar[str] = "member_slash"
    author: str
    target: str
    grounds: str  # one of MEMBER_SLASH_GROUNDS
    evidence: int  # the round the grounds refer to


MemberTx = Union[Admit, Leave, MemberSlash]
MEMBER_TXS = (Admit, Leave, MemberSlash)


@functools.lru_cache(maxsize=1024)
def open_request(raw: bytes) -> tuple[str, JoinRequest | LeaveRequest]:
    """(signer, request) of an embedded signed request; RemoteProtocolError if it is not
    one, or its signature does not hold. No clock: it was fresh when a validator took it
    from gossip, and it stays valid evidence in the ledger after that."""
    from protocol.messages import decode  # the message registry imports protocol.admission

    try:
        envelope = Envelope.from_gossip_bytes(raw)
        message = decode(envelope.body)
    except RemoteProtocolError as exc:
        raise _reject("malformed_member_request", f"embedded request: {exc.hint}") from None
    if not isinstance(message, (JoinRequest, LeaveRequest)) or envelope.signed_for:
        raise _reject("malformed_member_request", "a membership record embeds a gossip JoinRequest or LeaveRequest")
    payload = signing_payload(envelope.body, envelope.uuid, envelope.timestamp_ms, envelope.signed_for)
    if not verify_signature(envelope.signed_by, payload, bytes.fromhex(envelope.signature[2:])):
        raise _reject("bad_signature", f"the embedded request is not signed by {envelope.signed_by}")
    return envelope.signed_by, message


def check_shape(tx: MemberTx) -> None:
    if isinstance(tx, MemberSlash):
        if tx.grounds not in MEMBER_SLASH_GROUNDS or not tx.target or tx.target == tx.author:
            raise _reject("malformed_tx", f"a member slash names another hotkey and one of {MEMBER_SLASH_GROUNDS}")
        return
    _, request = open_request(tx.request)
    wanted = JoinRequest if isinstance(tx, Admit) else LeaveRequest
    if not isinstance(request, wanted):
        raise _reject("malformed_tx", f"{tx.KIND} embeds a {wanted.TYPE}")
    if isinstance(tx, Leave) and tx.penalty < 0:
        raise _reject("malformed_tx", "a penalty is not negative")


# --- the book ---------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    roles: tuple[str, ...]
    stake: int  # in escrow while a member
    peer_id: str
    addrs: tuple[str, ...]
    admitted_at_round: int  # the ledger's rounds_settled when it was admitted

    def to_wire(self) -> list[Any]:
        return [list(self.roles), self.stake, self.peer_id, list(self.addrs), self.admitted_at_round]


@dataclass(frozen=True)
class MemberBook:
    members: dict[str, Entry] = field(default_factory=dict)  # admitted, not (yet) gone
    joins: dict[str, int] = field(default_factory=dict)  # hotkey -> admissions, ever
    departed: tuple[str, ...] = ()  # founding hotkeys that left or were slashed, sorted
    slashed: dict[str, int] = field(default_factory=dict)  # hotkey -> rounds_settled when slashed
    staked: int = 0  # stake that entered the head by admissions, ever (part of the ledger's deposited)
    forfeited: int = 0  # escrow that went to the reward pool by penalties and slashes, ever

    @property
    def empty(self) -> bool:
        return not (self.members or self.joins or self.departed or self.slashed or self.staked
                    or self.forfeited)

    @property
    def escrowed(self) -> int:
        return sum(e.stake for e in self.members.values())

    def is_member(self, hotkey: str, founding: frozenset[str]) -> bool:
        return hotkey in self.members or (hotkey in founding and hotkey not in self.departed)

    def member_count(self, founding: frozenset[str]) -> int:
        return len(self.members) + len(founding - set(self.departed) - set(self.members))

    def to_wire(self) -> dict[str, Any]:
        return {"members": {k: e.to_wire() for k, e in sorted(self.members.items())},
                "joins": dict(sorted(self.joins.items())), "departed": list(self.departed),
                "slashed": dict(sorted(self.slashed.items())), "staked": self.staked,
                "forfeited": self.forfeited}

    @classmethod
    def from_wire(cls, wire: Any) -> "MemberBook":
        try:
            if not isinstance(wire, dict) or set(wire) != {"members", "joins", "departed", "slashed", "staked",
                                                     "forfeited"} \
                    or not _count(wire["staked"]) or not _count(wire["forfeited"]):
                raise ValueError("fields")
            members = {}
            for hotkey, (roles, stake, peer_id, addrs, at) in wire["members"].items():
                if not (isinstance(hotkey, str) and isinstance(roles, list) and all(isinstance(r, str) for r in roles)
                        and _count(stake) and isinstance(peer_id, str) and isinstance(addrs, list)
                        and all(isinstance(a, str) for a in addrs) and _count(at)):
                    raise ValueError("member")
                members[hotkey] = Entry(tuple(roles), stake, peer_id, tuple(addrs), at)
            joins, slashed, departed = wire["joins"], wire["slashed"], wire["departed"]
            if not (isinstance(joins, dict) and all(isinstance(k, str) and _count(v) for k, v in joins.items())
                    and isinstance(slashed, dict) and all(isinstance(k, str) and _count(v) for k, v in slashed.items())
                    and isinstance(departed, list) and departed == sorted(set(departed))
                    and all(isinstance(d, str) for d in departed)):
                raise ValueError("lists")
        except (ValueError, TypeError):
            raise _reject("malformed_snapshot", "a membership book has members, joins, departed, slashed") from None
        book = cls(members, dict(joins), tuple(departed), dict(slashed), wire["staked"], wire["forfeited"])
        if book.empty:
            raise _reject("malformed_snapshot", "an empty membership book is left out of the ledger")
        return book

    def directory_members(self, founding: tuple[Member, ...]) -> tuple[Member, ...]:
        """The members this book and the founding set make: founding ones still in, then
        the admitted ones (roles from their request, stake from their escrow)."""
        kept = [m for m in founding if m.hotkey not in self.departed and m.hotkey not in self.members]
        admitted = [Member(hotkey, frozenset(Role(r) for r in e.roles), float(e.stake))
                    for hotkey, e in sorted(self.members.items())]
        return tuple(kept + admitted)


EMPTY_BOOK = MemberBook()


class LiveDirectory:
    """The mesh's directory: the founding members (genesis) plus a confirmed book.

    A MemberDirectory (protocol/membership.py) whose content is replaced, whole, each
    time a newer fully signed snapshot arrives; the verifier, the roles and the status
    all read the same object, so a member admitted there is a member everywhere."""

    def __init__(self, founding: tuple[Member, ...]) -> None:
        self.founding = founding
        self.founding_hotkeys = frozenset(m.hotkey for m in founding)
        self.book = EMPTY_BOOK
        self.members = founding
        self._by_hotkey = {m.hotkey: m for m in founding}

    def member(self, hotkey: str) -> Member | None:
        return self._by_hotkey.get(hotkey)

    def set_founding(self, founding: tuple[Member, ...]) -> tuple[list[str], list[str]]:
        """A re-read registry (a Bittensor metagraph: registrations, deregistrations) as the
        founding set, keeping the book: (hotkeys added, hotkeys removed)."""
        self.founding = founding
        self.founding_hotkeys = frozenset(m.hotkey for m in founding)
        return self.apply(self.book)

    def apply(self, book: MemberBook) -> tuple[list[str], list[str]]:
        """Take this book as the confirmed one: (hotkeys added, hotkeys removed)."""
        before = set(self._by_hotkey)
        self.book = book
        self.members = book.directory_members(self.founding)
        self._by_hotkey = {m.hotkey: m for m in self.members}
        return sorted(set(self._by_hotkey) - before), sorted(before - set(self._by_hotkey))


def _count(value: Any) -> bool:
    return type(value) is int and 0 <= value < 2**63


# --- ledger rules (the same at every party) ----------------------------------------


def apply_member_tx(ledger: Any, tx: MemberTx, pool: str) -> Any:
    """The ledger (protocol/head.Ledger) after a membership record, or RemoteProtocolError."""
    book = ledger.book
    if isinstance(tx, Admit):
        hotkey, request = open_request(tx.request)
        assert isinstance(request, JoinRequest)
        if hotkey in book.members:
            raise _reject("already_member", f"{hotkey} is a member already")
        if request.joins_before != book.joins.get(hotkey, 0):
            raise _reject("stale_join", f"{hotkey} was admitted {book.joins.get(hotkey, 0)} time(s); "
                          "this request was used already")
        entry = Entry(tuple(sorted(request.roles)), request.stake, request.peer_id, tuple(request.addrs),
                      ledger.rounds_settled)
        new = replace(book, members={**book.members, hotkey: entry},
                      joins={**book.joins, hotkey: request.joins_before + 1},
                      departed=tuple(d for d in book.departed if d != hotkey),
                      staked=book.staked + request.stake)
        return replace(ledger, book=new, deposited=ledger.deposited + request.stake)
    if isinstance(tx, Leave):
        hotkey, request = open_request(tx.request)
        assert isinstance(request, LeaveRequest)
        if request.joins_before != book.joins.get(hotkey, 0) or hotkey in book.departed:
            raise _reject("stale_leave", f"this leave of {hotkey} belongs to an earlier membership")
        stake = book.members[hotkey].stake if hotkey in book.members else 0
        if tx.penalty > stake:
            raise _reject("bad_penalty", f"a penalty of {tx.penalty} exceeds the escrow of {stake}")
        return _remove(ledger, hotkey, released=stake - tx.penalty, to_pool=tx.penalty, pool=pool)
    if tx.target in book.departed:
        raise _reject("not_a_member", f"{tx.target} is not a member")
    stake = book.members[tx.target].stake if tx.target in book.members else 0
    ledger = _remove(ledger, tx.target, released=0, to_pool=stake, pool=pool)
    return replace(ledger, book=replace(ledger.book, slashed={**ledger.book.slashed,
                                                              tx.target: ledger.rounds_settled}))


def _remove(ledger: Any, hotkey: str, *, released: int, to_pool: int, pool: str) -> Any:
    book = ledger.book
    members = {k: e for k, e in book.members.items() if k != hotkey}
    # Marked departed whether it was founding or admitted: for a founding hotkey that is
    # what ends its membership; for an admitted one it is harmless (is_member asks
    # departed only of founding hotkeys), and an Admit clears it again.
    departed = tuple(sorted(set(book.departed) | {hotkey}))
    balances = dict(ledger.balances)
    if to_pool:
        balances[pool] = balances.get(pool, 0) + to_pool
    withdrawn = dict(ledger.withdrawn)
    if released:
        withdrawn[hotkey] = withdrawn.get(hotkey, 0) + released
    return replace(ledger, book=replace(book, members=members, departed=departed,
                                        forfeited=book.forfeited + to_pool), balances=balances,
                   withdrawn=withdrawn)


# --- whether a party co-signs one (its admission rules) ----------------------------


@dataclass(frozen=True)
class MembershipRules:
    """What a party judges membership records against: the mesh, its founding set, the
    admission policy. The node sets it from the genesis file and its settings."""

    mesh_id: str
    founding: frozenset[str]
    policy: AdmissionPolicy = AdmissionPolicy()
    # This party's own views of whom its rounds named (protocol/offences.py), which a
    # MemberSlash must match. Held by reference: the node adds a view as each round ends.
    offences: OffenceViews | None = field(default=None, compare=False)


def record_problem(tx: MemberTx, ledger: Any, rules: MembershipRules | None) -> tuple[str, str] | None:
    """Why this party would not co-sign a membership record on the confirmed `ledger`."""
    if rules is None:
        return ("no_membership_rules", "this party has no admission rules; it co-signs no membership record")
    book: MemberBook = ledger.book
    if isinstance(tx, MemberSlash):
        if not book.is_member(tx.target, rules.founding):
            return ("not_a_member", f"{tx.target} is not a member")
        return slash_evidence_problem(tx.target, tx.grounds, tx.evidence, rules.offences)
    hotkey, request = open_request(tx.request)
    if isinstance(tx, Admit):
        assert isinstance(request, JoinRequest)
        return admission_problem(
            hotkey, request, mesh_id=rules.mesh_id, is_member=book.is_member(hotkey, rules.founding),
            joins_before=book.joins.get(hotkey, 0), member_count=book.member_count(rules.founding),
            slashed_at_round=book.slashed.get(hotkey), rounds_settled=ledger.rounds_settled, policy=rules.policy)
    assert isinstance(request, LeaveRequest)
    problem = leave_problem(hotkey, request, mesh_id=rules.mesh_id,
                            is_member=book.is_member(hotkey, rules.founding),
                            joins_before=book.joins.get(hotkey, 0))
    if problem:
        return problem
    entry = book.members.get(hotkey)
    due = 0 if entry is None else leave_penalty(entry.stake, entry.admitted_at_round, ledger.rounds_settled,
                                                rules.policy)
    if tx.penalty != due:
        return ("wrong_penalty", f"the leave of {hotkey} forfeits {due} by the rule, the record says {tx.penalty}")
    return None


def settled_records(tx: MemberTx, ledger_before: Any, number: int) -> list[tuple[str, dict[str, Any]]]:
    """(kind, data) of what a confirmed membership record did, for the node's log and status."""
    if isinstance(tx, MemberSlash):
        return [("member_slashed", {"hotkey": tx.target, "grounds": tx.grounds, "evidence": tx.evidence,
                                    "snapshot": number})]
    hotkey, request = open_request(tx.request)
    if isinstance(tx, Admit):
        assert isinstance(request, JoinRequest)
        return [("member_admitted", {"hotkey": hotkey, "roles": sorted(request.roles), "stake": request.stake,
                                     "peer_id": request.peer_id, "snapshot": number})]
    return [("member_left", {"hotkey": hotkey, "penalty": tx.penalty, "snapshot": number})]


__all__ = ["Admit", "EMPTY_BOOK", "Entry", "Leave", "LiveDirectory", "MEMBER_SLASH_GROUNDS", "MEMBER_TXS", "MemberBook",
           "MemberSlash", "MembershipRules", "apply_member_tx", "check_shape", "open_request",
           "record_problem", "settled_records"]
