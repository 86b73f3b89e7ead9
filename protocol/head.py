"""Settlement head: a multi-signed state channel among the validators (sans-IO).

The lifecycle and the snapshot protocol follow the Hydra Head (Chakravarty et al.,
"Hydra: Fast Isomorphic State Channels", FC 2021) as hydra-node exposes it:
HeadStatus Idle -> Initializing -> Open -> Closed -> FanoutPossible -> Final, Commit and
incremental Deposit/Recover, NewTx, ReqSn/AckSn snapshots signed by every party, Close
with the latest confirmed snapshot, Contest with a newer one, Fanout after the deadline.
The model is specs/Head.tla: the event classes and handlers here carry its action
names and the functions at the end its invariant names.

Each party runs one HeadMachine. Events go in (local commands, received messages, time);
effects come out (messages to broadcast on the settle channel, records to persist,
timers). Nothing here touches a socket, a disk or a clock.

Where this head differs from Hydra, because the mesh has no L1 to order things:
- the value in the ledger is an account balance map, not UTxO; rewards are paid out of
  a reward pool account funded at commit, so every transaction conserves value;
- escrow is locked at commit outside the ledger and redistributed at fanout: a party
  that a strict majority voted against (SlashVote) loses it to the others;
- a party that restarts asks for newer fully signed snapshots (Sync), since a snapshot
  that all parties signed is authoritative for everyone.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import math
import re
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, ClassVar, Union

import msgpack

from crypto.identity import verify_signature
from protocol._wire import unpack_strict
from protocol.epistula import Signer
from protocol import head_rules as rules
from protocol import member_book as mb
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.messages import decode as decode_message
from protocol.messages import encode as encode_message
from protocol.head_messages import (HeadAbort, HeadAckSn, HeadClose, HeadCommit, HeadContest,
                                    HeadDeposit, HeadInit, HeadMessage, HeadNackSn, HeadNewTx,
                                    HeadRecover, HeadReqSn, HeadSync, HeadSyncRequest)

POOL = "reward_pool"  # the ledger account rewards are paid from; not an SS58 address
CLOCK_SKEW_MS = 8_000  # a Close stamped further from our clock is refused (Epistula's window)
MAX_SNAPSHOT_TXS = 1000
VIEWS_KEPT = 2 * rules.RECORD_WINDOW  # own views of rounds (epochs) kept before pruning old ones
SLASH_GROUNDS = ("early_close", "withheld_signature")

Verify = Callable[[str, bytes, bytes], bool]


class HeadMisuse(LocalProtocolError):
    """We asked our own machine for something the head's rules forbid."""

    def __init__(self, hint: str, *, reason: str) -> None:
        super().__init__(f"{reason}: {hint}")
        self.reason = reason


def _reject(reason: str, hint: str) -> RemoteProtocolError:
    return RemoteProtocolError(hint, reason=reason)


class AwaitingOwnView(RemoteProtocolError):
    """A request holds a record this party cannot judge yet: its own RoundFinal (or epoch
    scores) has not come. The request waits and is judged again when it comes."""


# --- canonical encoding -------------------------------------------------------------


def canonical(value: Any) -> bytes:
    """msgpack with map keys sorted at every level: equal values give equal bytes."""
    return msgpack.packb(_sorted_maps(value), use_bin_type=True)


def _sorted_maps(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted_maps(value[k]) for k in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_sorted_maps(v) for v in value]
    return value


def _sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _conforms(value: Any, hint: Any) -> bool:
    return _checker(hint)(value)


@functools.cache
def _checker(hint: Any) -> Callable[[Any], bool]:
    """A type test for a field hint, built once per hint (state reloads check a lot)."""
    origin = typing.get_origin(hint)
    if origin is list:
        item = _checker(typing.get_args(hint)[0])
        return lambda v: isinstance(v, list) and all(map(item, v))
    if origin is dict:
        key_hint, item_hint = typing.get_args(hint)
        key, item = _checker(key_hint), _checker(item_hint)
        return lambda v: isinstance(v, dict) and all(key(k) and item(x) for k, x in v.items())
    if hint is int:
        return lambda v: type(v) is int and 0 <= v < 2**63
    if hint is float:
        return lambda v: type(v) is float and math.isfinite(v)
    if hint is str or hint is bytes:
        return lambda v: type(v) is hint
    return lambda v: isinstance(v, hint)


# --- off-chain transactions ---------------------------------------------------------


@dataclass(frozen=True)
class RoundResult:
    """A training round's outcome: the new adapter, who contributed, what each earns."""

    KIND: ClassVar[str] = "round_result"
    author: str
    round: int
    adapter_id: str
    contributors: list[str]
    rewards: dict[str, int]


@dataclass(frozen=True)
class ScoreReport:
    """An epoch's miner scores and the rewards they earn."""

    KIND: ClassVar[str] = "score_report"
    author: str
    epoch: int
    scores: dict[str, float]
    rewards: dict[str, int]


@dataclass(frozen=True)
class Transfer:
    KIND: ClassVar[str] = "transfer"
    author: str
    recipient: str
    amount: int
    nonce: int  # lets the same payment be made twice with two ids


@dataclass(frozen=True)
class SlashVote:
    """A vote to take `target`'s escrow; acts on escrow, never on the ledger."""

    KIND: ClassVar[str] = "slash_vote"
    author: str
    target: str
    grounds: str  # one of SLASH_GROUNDS
    evidence: int  # the snapshot number the grounds refer to


@dataclass(frozen=True)
class Withdraw:
    """A party takes `amount` of its own balance out of the open head (Hydra's decommit):
    the value leaves the ledger into `withdrawn`, paid out by the node once a snapshot
    confirms it. `withdrawn_before` is what the author had withdrawn until now: it makes
    each withdraw apply at most once without keeping its id."""

    KIND: ClassVar[str] = "withdraw"
    author: str
    amount: int
    withdrawn_before: int


Tx = Union[RoundResult, ScoreReport, Transfer, SlashVote, Withdraw, mb.Admit, mb.Leave, mb.MemberSlash]
TX_KINDS: dict[str, type] = {c.KIND: c for c in (RoundResult, ScoreReport, Transfer, SlashVote,
                                                  Withdraw, *mb.MEMBER_TXS)}


def encode_tx(tx: Tx) -> bytes:
    return canonical({"kind": tx.KIND, **{f.name: getattr(tx, f.name) for f in fields(tx)}})


def tx_id(raw: bytes) -> str:
    """A transaction's id: sha256 of its canonical msgpack encoding."""
    return _sha256(raw)


def tx_signing_payload(head_id: str, txid: str) -> bytes:
    return canonical(["sealmesh/head/tx", head_id, txid])


@functools.lru_cache(maxsize=4096)  # pure, and ledgers re-apply the same pending txs often
def decode_tx(raw: bytes) -> Tx:
    """Strictly decode a transaction; only its canonical encoding is accepted."""
    try:
        wire = unpack_strict(raw)
    except Exception as exc:  # msgpack raises several unrelated types
        raise _reject("malformed_tx", f"not a msgpack transaction: {exc}") from exc
    cls = TX_KINDS.get(wire.get("kind")) if isinstance(wire, dict) else None
    if cls is None:
        raise _reject("malformed_tx", "a transaction is a map whose kind is one of "
                      f"{sorted(TX_KINDS)}")
    hints = _tx_field_types(cls)
    names = set(hints)
    if set(wire) != names | {"kind"}:
        raise _reject("malformed_tx", f"{cls.KIND} needs exactly the fields {sorted(names)}")
    for name in names:
        if not _conforms(wire[name], hints[name]):
            raise _reject("malformed_tx", f"{cls.KIND}.{name}: expected {hints[name]}")
    tx = cls(**{name: wire[name] for name in names})
    if encode_tx(tx) != raw:
        raise _reject("non_canonical_tx", "transaction bytes are not in canonical form")
    _check_tx_shape(tx)
    return tx


@functools.cache
def _tx_field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _check_tx_shape(tx: Tx) -> None:
    if isinstance(tx, mb.MEMBER_TXS):  # membership records (issue 15): protocol/member_book.py
        mb.check_shape(tx)
    elif isinstance(tx, (RoundResult, ScoreReport)):
        if any(amount <= 0 or not who or who == POOL for who, amount in tx.rewards.items()):
            raise _reject("malformed_tx", "each reward goes to a named account and is positive")
    elif isinstance(tx, Transfer):
        if tx.amount <= 0 or not tx.recipient or tx.recipient == POOL:
            raise _reject("malformed_tx", "a transfer moves a positive amount to a named account")
    elif isinstance(tx, Withdraw):
        if tx.amount <= 0 or tx.author == POOL:
            raise _reject("malformed_tx", "a withdraw takes a positive amount of the author's own")
    elif tx.grounds not in SLASH_GROUNDS or tx.target == tx.author:
        raise _reject("malformed_tx", f"a slash vote names another party and one of {SLASH_GROUNDS}")


# --- ledger rules -------------------------------------------------------------------


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
                _conforms(wire[k], hint) for k, hint in shape.items()):
            raise _reject("malformed_snapshot", f"a ledger has exactly the fields {sorted(shape)}")
        rounds, epochs = (_window_from_wire(wire[k], k) for k in ("rounds", "epochs"))
        book = mb.MemberBook.from_wire(wire["members"]) if "members" in wire else mb.EMPTY_BOOK
        return cls(dict(wire["balances"]), tuple(wire["applied"]), *rounds, *epochs,
                   tuple(wire["deposits"]), wire["deposited"], dict(wire["withdrawn"]), book)

    def hash(self) -> str:
        return self._hash

    @functools.cached_property
    def _hash(self) -> str:  # a frozen ledger hashes the same every time
        return _sha256(canonical(self.to_wire()))


def _window_from_wire(wire: Any, what: str) -> tuple[int, tuple[int, ...], int]:
    """[below, recent, settled]: recent sorted, inside [below, below + RECORD_WINDOW)."""
    ok = (isinstance(wire, list) and len(wire) == 3 and _conforms(wire[0], int)
          and _conforms(wire[1], list[int]) and _conforms(wire[2], int))
    if ok:
        below, recent, settled = wire[0], tuple(wire[1]), wire[2]
        ok = (list(recent) == sorted(set(recent)) and settled >= len(recent)
              and all(below <= r < below + rules.RECORD_WINDOW for r in recent))
    if not ok:
        raise _reject("malformed_snapshot", f"a ledger's {what} are [below, sorted recent ids "
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
            raise _reject(*problem)
        _pay_from_pool(balances, tx.rewards)
        below, recent = rules.settle_in_window(ledger.rounds_below, ledger.rounds_recent, tx.round)
        return replace(ledger, balances=balances, rounds_below=below, rounds_recent=recent,
                       rounds_settled=ledger.rounds_settled + 1)
    if isinstance(tx, ScoreReport):
        problem = rules.window_problem(ledger.epochs_below, ledger.epochs_recent, tx.epoch, "epoch")
        if problem:
            raise _reject(*problem)
        _pay_from_pool(balances, tx.rewards)
        below, recent = rules.settle_in_window(ledger.epochs_below, ledger.epochs_recent, tx.epoch)
        return replace(ledger, balances=balances, epochs_below=below, epochs_recent=recent,
                       epochs_settled=ledger.epochs_settled + 1)
    if isinstance(tx, Transfer):
        if txid in ledger.applied:
            raise _reject("duplicate_tx", f"transaction {txid[:12]} was already applied")
        _take(balances, tx.author, tx.amount, f"send {tx.amount}")
        balances[tx.recipient] = balances.get(tx.recipient, 0) + tx.amount
        return replace(ledger, balances=balances, applied=ledger.applied + (txid,))
    if isinstance(tx, Withdraw):
        before = ledger.withdrawn.get(tx.author, 0)
        if tx.withdrawn_before != before:
            raise _reject("stale_withdraw", f"{tx.author} has withdrawn {before} so far, not "
                          f"{tx.withdrawn_before}: this withdraw was applied or overtaken")
        _take(balances, tx.author, tx.amount, f"withdraw {tx.amount}")
        return replace(ledger, balances=balances,
                       withdrawn={**ledger.withdrawn, tx.author: before + tx.amount})
    raise _reject("not_a_ledger_tx", "slash votes act on escrow, not on the ledger")


def _take(balances: dict[str, int], who: str, amount: int, what: str) -> None:
    if balances.get(who, 0) < amount:
        raise _reject("insufficient_funds", f"{who} holds {balances.get(who, 0)}, cannot {what}")
    balances[who] -= amount


def _pay_from_pool(balances: dict[str, int], rewards: dict[str, int]) -> None:
    total = sum(rewards.values())
    if balances.get(POOL, 0) < total:
        raise _reject("insufficient_pool", f"rewards of {total} exceed the reward pool's "
                      f"{balances.get(POOL, 0)}")
    balances[POOL] -= total
    for who, amount in rewards.items():
        balances[who] = balances.get(who, 0) + amount


def apply_deposit(ledger: Ledger, deposit_id: str, party: str, amount: int) -> Ledger:
    if deposit_id in ledger.deposits:
        raise _reject("duplicate_deposit", f"deposit {deposit_id[:12]} was already absorbed")
    balances = dict(ledger.balances)
    balances[party] = balances.get(party, 0) + amount
    return replace(ledger, balances=balances, deposits=ledger.deposits + (deposit_id,),
                   deposited=ledger.deposited + amount)


# --- snapshots ----------------------------------------------------------------------


def snapshot_signing_payload(head_id: str, number: int, tx_ids: tuple[str, ...] | list[str],
                             deposit_id: str, ledger_hash: str) -> bytes:
    return canonical(["sealmesh/head/snapshot", head_id, number, list(tx_ids), deposit_id,
                      ledger_hash])


@dataclass(frozen=True)
class Snapshot:
    number: int
    tx_ids: tuple[str, ...]
    deposit_id: str  # "" when it absorbs no deposit
    ledger: Ledger
    signatures: dict[str, bytes]  # party -> signature on the signing payload; {} for number 0

    def signing_payload(self, head_id: str) -> bytes:
        return snapshot_signing_payload(head_id, self.number, self.tx_ids, self.deposit_id,
                                        self.ledger.hash())

    def to_wire(self) -> dict[str, Any]:
        return {"number": self.number, "tx_ids": list(self.tx_ids), "deposit_id": self.deposit_id,
                "ledger": self.ledger.to_wire(), "signatures": dict(self.signatures)}

    def encode(self) -> bytes:
        return canonical(self.to_wire())

    @classmethod
    def from_wire(cls, wire: Any) -> "Snapshot":
        shape = {"number": int, "tx_ids": list[str], "deposit_id": str, "ledger": dict,
                 "signatures": dict[str, bytes]}
        if not isinstance(wire, dict) or set(wire) != set(shape) or not all(
                _conforms(wire[k], hint) for k, hint in shape.items()):
            raise _reject("malformed_snapshot", f"a snapshot has exactly the fields {sorted(shape)}")
        return cls(wire["number"], tuple(wire["tx_ids"]), wire["deposit_id"],
                   Ledger.from_wire(wire["ledger"]), dict(wire["signatures"]))

    @classmethod
    def decode(cls, raw: bytes) -> "Snapshot":
        try:
            wire = unpack_strict(raw)
        except Exception as exc:  # msgpack raises several unrelated types
            raise _reject("malformed_snapshot", f"not a msgpack snapshot: {exc}") from exc
        return cls.from_wire(wire)


def refusal_signing_payload(head_id: str, number: int, reason: str) -> bytes:
    return canonical(["sealmesh/head/refusal", head_id, number, reason])


_REASON = re.compile(r"[a-z_]{1,64}")


# --- parameters, phases, events, effects --------------------------------------------


class Phase(str, enum.Enum):
    """hydra-node's HeadStatus."""

    IDLE = "Idle"
    INITIALIZING = "Initializing"
    OPEN = "Open"
    CLOSED = "Closed"
    FANOUT_POSSIBLE = "FanoutPossible"
    FINAL = "Final"


@dataclass(frozen=True)
class HeadParameters:
    head_id: str
    parties: tuple[str, ...]  # validators' hotkeys, sorted: the snapshot leader rotation
    contestation_period_ms: int
    # A deposit may be absorbed by the next deposit_period_snapshots snapshots and no
    # later: counted in snapshot numbers, which every party agrees on, not on its own
    # clock (issue 11, finding 6).
    deposit_period_snapshots: int
    sign_timeout_ms: int
    agreed_rounds: int  # closing before this many RoundResults are settled is slashable
    escrow: int  # each party locks this much at commit
    # The records the head may settle (head_rules): round ids 0..round_limit-1, epochs
    # 0..epoch_limit-1, each paying its reward from the pool by the rule.
    round_limit: int = 0
    epoch_limit: int = 0
    round_reward: int = 0
    epoch_reward: int = 0

    def problems(self) -> list[str]:
        found = []
        if not self.head_id:
            found.append("head_id is empty")
        if not self.parties or list(self.parties) != sorted(set(self.parties)):
            found.append("parties must be a non-empty sorted list without repeats")
        if min(self.contestation_period_ms, self.deposit_period_snapshots, self.sign_timeout_ms) <= 0:
            found.append("periods and timeouts must be positive")
        if min(self.agreed_rounds, self.escrow, self.round_limit, self.epoch_limit,
               self.round_reward, self.epoch_reward) < 0:
            found.append("counts, escrow and rewards must not be negative")
        if self.agreed_rounds > self.round_limit:
            found.append("agreed_rounds cannot exceed round_limit: those rounds could never settle")
        return found

    def leader(self, number: int) -> str:
        """Round-robin by snapshot number, as in Hydra's coordinated head protocol."""
        return self.parties[(number - 1) % len(self.parties)]

    @property
    def majority(self) -> int:
        """Strictly more than half of the parties."""
        return len(self.parties) // 2 + 1

    def to_message(self) -> HeadInit:
        return HeadInit(self.head_id, list(self.parties), self.contestation_period_ms,
                        self.deposit_period_snapshots, self.sign_timeout_ms, self.agreed_rounds,
                        self.escrow, self.round_limit, self.epoch_limit, self.round_reward,
                        self.epoch_reward)

    @classmethod
    def from_message(cls, message: HeadInit) -> "HeadParameters":
        return cls(message.head_id, tuple(message.parties), message.contestation_period_ms,
                   message.deposit_period_snapshots, message.sign_timeout_ms, message.agreed_rounds,
                   message.escrow, message.round_limit, message.epoch_limit,
                   message.round_reward, message.epoch_reward)


# Local commands and inputs; a received message becomes a Receive. Names are the
# actions of specs/Head.tla.

@dataclass(frozen=True)
class Init:
    parameters: HeadParameters
    now_ms: int


@dataclass(frozen=True)
class Commit:
    escrow: int
    balance: int
    pool: int
    now_ms: int


@dataclass(frozen=True)
class Abort:
    now_ms: int


@dataclass(frozen=True)
class NewTx:
    tx: Tx  # authored by this party; the machine signs it
    now_ms: int


@dataclass(frozen=True)
class Deposit:
    amount: int
    nonce: int
    now_ms: int


@dataclass(frozen=True)
class Recover:
    deposit_id: str
    now_ms: int


@dataclass(frozen=True)
class Close:
    now_ms: int


@dataclass(frozen=True)
class Fanout:
    now_ms: int


@dataclass(frozen=True)
class Tick:
    now_ms: int


@dataclass(frozen=True)
class Restart:
    """Fed once after the machine is reloaded from storage."""

    now_ms: int


@dataclass(frozen=True)
class ObserveRound:
    """This party's own RoundFinal of a round (from its rounds service): what it co-signs
    a RoundResult against. Local input, trusted as this node's own view."""

    round: int
    adapter_id: str
    contributors: list[str]
    now_ms: int


@dataclass(frozen=True)
class ObserveEpoch:
    """This party's own scores of an epoch's miners (from its challenger service)."""

    epoch: int
    scores: dict[str, float]
    now_ms: int


@dataclass(frozen=True)
class Receive:
    sender: str  # the Epistula signer, already verified by the node
    message: HeadMessage
    now_ms: int


Event = Union[Init, Commit, Abort, NewTx, Deposit, Recover, Close, Fanout, Tick, Restart,
              ObserveRound, ObserveEpoch, Receive]


@dataclass(frozen=True)
class Send:
    """Broadcast on the settle channel."""

    message: HeadMessage


@dataclass(frozen=True)
class Record:
    """Something to persist and report: a confirmed snapshot, a round result, a payout."""

    kind: str
    data: dict[str, Any]


@dataclass(frozen=True)
class SetTimer:
    """Feed a Tick at or after at_ms."""

    at_ms: int
    purpose: str


Effect = Union[Send, Record, SetTimer]

P = Phase
# Phase changes (h11's table style): (action, from) -> the phases it may lead to. No
# other code changes `phase`.
TRANSITIONS: dict[tuple[str, Phase], frozenset[Phase]] = {
    ("Init", P.IDLE): frozenset({P.INITIALIZING}),
    ("Commit", P.INITIALIZING): frozenset({P.INITIALIZING, P.OPEN}),  # the last commit opens
    ("Abort", P.INITIALIZING): frozenset({P.FINAL}),
    ("Close", P.OPEN): frozenset({P.CLOSED}),
    ("Close", P.CLOSED): frozenset({P.CLOSED}),  # a concurrent close merges into the first
    ("Contest", P.CLOSED): frozenset({P.CLOSED}),
    ("Tick", P.CLOSED): frozenset({P.CLOSED, P.FANOUT_POSSIBLE}),
    ("Fanout", P.FANOUT_POSSIBLE): frozenset({P.FINAL}),
}
# Actions that never change phase, and where they are allowed.
STAY_IN: dict[str, frozenset[Phase]] = {
    "NewTx": frozenset({P.OPEN}),
    "ReqSn": frozenset({P.OPEN}),
    "AckSn": frozenset({P.OPEN}),
    "NackSn": frozenset({P.OPEN}),
    "Deposit": frozenset({P.OPEN}),
    "Recover": frozenset({P.OPEN, P.CLOSED, P.FANOUT_POSSIBLE, P.FINAL}),
    "SlashVote": frozenset({P.OPEN, P.CLOSED, P.FANOUT_POSSIBLE}),
    "Sync": frozenset({P.OPEN}),
    "Contest": frozenset({P.OPEN}),  # it overtook its Close: confirm its snapshot
    "Tick": frozenset(Phase),
    "Restart": frozenset(Phase),
}


def allowed(action: str, phase: Phase) -> bool:
    return (action, phase) in TRANSITIONS or phase in STAY_IN.get(action, frozenset())


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


# --- the machine --------------------------------------------------------------------


class HeadMachine:
    """One party's view of the head. `handle` is the only entry point."""

    def __init__(self, signer: Signer, *, verify: Verify = verify_signature) -> None:
        self.signer = signer
        self.me = signer.ss58_address
        self.verify = verify
        self.phase = Phase.IDLE
        self.params: HeadParameters | None = None
        self.commits: dict[str, tuple[int, int, int]] = {}  # party -> (escrow, balance, pool)
        self.confirmed: Snapshot | None = None
        self.pending: dict[str, tuple[bytes, bytes]] = {}  # tx id -> (tx, signature), arrival order
        self.proposal: Proposal | None = None
        self.waiting: HeadReqSn | None = None  # a ReqSn that came while we were behind
        self.early_acks: dict[str, bytes] = {}  # AckSn for confirmed+1 before its ReqSn
        # Signed refusals (NackSn) of snapshots not yet confirmed: party -> (number,
        # reason, signature), the newest per party. They block withheld_signature votes.
        self.refusals: dict[str, tuple[int, str, bytes]] = {}
        self.deposits: dict[str, DepositRecord] = {}
        self.closing: Closing | None = None
        self.votes: dict[str, dict[str, tuple[bytes, bytes]]] = {}  # target -> voter -> (tx, sig)
        self.payouts: dict[str, int] | None = None
        self.early: list[tuple[str, bytes]] = []  # (sender, message) that came before Init
        # Our own view of finished rounds and epochs (ObserveRound/ObserveEpoch): the
        # records we co-sign must match it (head_rules).
        self.observed_rounds: dict[int, list[Any]] = {}
        self.observed_epochs: dict[int, dict[str, float]] = {}
        # Views under these were pruned (_prune_views): the records they judged are settled.
        self.views_pruned_rounds = 0
        self.views_pruned_epochs = 0
        self._pending_ledger: Ledger | None = None  # derived: confirmed ledger + pending txs
        # What this party judges membership records against (configuration, not state:
        # the node sets it from the genesis file and its settings); None co-signs none.
        self.membership: mb.MembershipRules | None = None

    # -- entry point ------------------------------------------------------------------

    def handle(self, event: Event) -> list[Effect]:
        if isinstance(event, Receive):
            return self._receive(event.sender, event.message, event.now_ms)
        return _COMMANDS[type(event)](self, event)

    # -- views -------------------------------------------------------------------------

    @property
    def parameters(self) -> HeadParameters:
        if self.params is None:
            raise HeadMisuse("no head was initialized", reason="no_head")
        return self.params

    @property
    def pending_ledger(self) -> Ledger:
        if self._pending_ledger is None:
            self._rebuild_pending()
        assert self._pending_ledger is not None
        return self._pending_ledger

    @property
    def committed_total(self) -> int:
        return sum(balance + pool for _, balance, pool in self.commits.values())

    @property
    def escrow_total(self) -> int:
        return sum(escrow for escrow, _, _ in self.commits.values())

    def slashed(self) -> list[str]:
        """Parties that a strict majority of the other parties voted against."""
        majority = self.params.majority if self.params else 1
        return sorted(t for t, voters in self.votes.items() if len(voters) >= majority)

    def deadline_ms(self) -> int | None:
        return self.closing.deadline(self.parameters) if self.closing else None

    # -- guards ------------------------------------------------------------------------

    def _require(self, action: str, *, local: bool) -> None:
        if not allowed(action, self.phase):
            hint = f"{action} is not allowed while the head is {self.phase.value}"
            if local:
                raise HeadMisuse(hint, reason="wrong_phase")
            raise _reject("wrong_phase", hint)

    def _move(self, action: str, to: Phase) -> None:
        if to not in TRANSITIONS.get((action, self.phase), frozenset()):
            raise LocalProtocolError(f"no transition {self.phase.value} -{action}-> {to.value}")
        self.phase = to

    # -- lifecycle: Init, Commit, Abort ------------------------------------------------

    def _init(self, event: Init) -> list[Effect]:
        self._require("Init", local=True)
        params = event.parameters
        if params.problems() or self.me not in params.parties:
            raise HeadMisuse("; ".join(params.problems() or ["this node is not a party"]),
                             reason="bad_parameters")
        self.params = params
        self._move("Init", Phase.INITIALIZING)
        return [Send(params.to_message()), Record("head_init", {"head_id": params.head_id})
                ] + self._replay_early(event.now_ms)

    def _on_init(self, sender: str, message: HeadInit, now_ms: int) -> list[Effect]:
        params = HeadParameters.from_message(message)
        if self.params == params:
            return []  # the same Init again
        self._require("Init", local=False)
        if params.problems():
            raise _reject("bad_parameters", "; ".join(params.problems()))
        if sender not in params.parties or self.me not in params.parties:
            raise _reject("not_a_party", "an Init names its sender and this node as parties")
        self.params = params
        self._move("Init", Phase.INITIALIZING)
        return [Record("head_init", {"head_id": params.head_id})] + self._replay_early(now_ms)

    def _keep_early(self, sender: str, message: HeadCommit | HeadAbort) -> list[Effect]:
        """A Commit or Abort that overtook its Init: keep one per sender and kind until it comes."""
        raw = encode_message(message)
        if not any(s == sender and decode_message(r).TYPE == message.TYPE for s, r in self.early):
            self.early.append((sender, raw))
        return []

    def _replay_early(self, now_ms: int) -> list[Effect]:
        effects: list[Effect] = []
        early, self.early = self.early, []
        for sender, raw in early:
            try:
                effects += self._receive(sender, decode_message(raw), now_ms)
            except RemoteProtocolError as exc:
                effects.append(Record("rejected", {"reason": exc.reason, "hint": exc.hint}))
        return effects

    def _commit(self, event: Commit) -> list[Effect]:
        self._require("Commit", local=True)
        self._check_commit(self.me, event.escrow, event.balance, event.pool, local=True)
        message = HeadCommit(self.parameters.head_id, event.escrow, event.balance, event.pool)
        return [Send(message)] + self._apply_commit(self.me, message)

    def _on_commit(self, sender: str, message: HeadCommit, now_ms: int) -> list[Effect]:
        self._require("Commit", local=False)
        self._check_commit(sender, message.escrow, message.balance, message.pool, local=False)
        return self._apply_commit(sender, message)

    def _check_commit(self, party: str, escrow: int, balance: int, pool: int, *,
                      local: bool) -> None:
        problem = None
        if party in self.commits:
            problem = ("duplicate_commit", f"{party} already committed")
        elif escrow != self.parameters.escrow:
            problem = ("wrong_escrow", f"the head's escrow is {self.parameters.escrow}, not {escrow}")
        elif balance < 0 or pool < 0:
            problem = ("negative_commit", "balance and pool must not be negative")
        if problem and local:
            raise HeadMisuse(problem[1], reason=problem[0])
        if problem:
            raise _reject(*problem)

    def _apply_commit(self, party: str, message: HeadCommit) -> list[Effect]:
        self.commits[party] = (message.escrow, message.balance, message.pool)
        effects: list[Effect] = [Record("commit", {"party": party, "escrow": message.escrow,
                                                   "balance": message.balance, "pool": message.pool})]
        if set(self.commits) != set(self.parameters.parties):
            self._move("Commit", Phase.INITIALIZING)
            return effects
        balances = {p: b for p, (_, b, _) in self.commits.items()}
        balances[POOL] = sum(pool for _, _, pool in self.commits.values())
        self.confirmed = Snapshot(0, (), "", Ledger(balances), {})
        self._pending_ledger = self.confirmed.ledger
        self._move("Commit", Phase.OPEN)
        return effects + [Record("head_open", {"balances": dict(balances)})]

    # Without an L1 to order an abort against the last commit, only a party that has not
    # committed may abort: the head then can never open anywhere, as it lacks that commit.

    def _abort(self, event: Abort) -> list[Effect]:
        self._require("Abort", local=True)
        if self.me in self.commits:
            raise HeadMisuse("a party that committed cannot abort", reason="committed")
        return [Send(HeadAbort(self.parameters.head_id))] + self._apply_abort(self.me)

    def _on_abort(self, sender: str, message: HeadAbort, now_ms: int) -> list[Effect]:
        self._require("Abort", local=False)
        if sender in self.commits:
            raise _reject("committed", f"{sender} committed, so it cannot abort")
        return self._apply_abort(sender)

    def _apply_abort(self, party: str) -> list[Effect]:
        # Every commit seen goes back whole to its party: nothing happened in the head yet.
        self.payouts = {p: sum(c) for p, c in sorted(self.commits.items())}
        self._move("Abort", Phase.FINAL)
        return [Record("aborted", {"by": party, "payouts": dict(self.payouts)})]

    # -- NewTx and SlashVote -----------------------------------------------------------

    def _newtx(self, event: NewTx) -> list[Effect]:
        if event.tx.author != self.me:
            raise HeadMisuse("a party submits only transactions it authored", reason="not_author")
        problem = self._record_problem(event.tx)
        if problem:
            raise HeadMisuse(problem[1], reason=problem[0])
        raw = encode_tx(event.tx)
        signature = self.signer.sign(tx_signing_payload(self.parameters.head_id, tx_id(raw)))
        try:
            effects = self._accept_tx(raw, signature, event.now_ms)
        except RemoteProtocolError as exc:
            raise HeadMisuse(exc.hint, reason=exc.reason) from None
        return [Send(HeadNewTx(self.parameters.head_id, raw, signature))] + effects

    def _on_new_tx(self, sender: str, message: HeadNewTx, now_ms: int) -> list[Effect]:
        return self._accept_tx(message.tx, message.signature, now_ms)

    def _accept_tx(self, raw: bytes, signature: bytes, now_ms: int) -> list[Effect]:
        tx = decode_tx(raw)
        txid = tx_id(raw)
        self._check_tx_signature(tx, raw, signature)
        if isinstance(tx, SlashVote):
            return self._count_vote(tx, raw, signature)
        self._require("NewTx", local=False)
        if txid in self.pending:
            raise _reject("duplicate_tx", f"transaction {txid[:12]} is already pending")
        problem = self._record_problem(tx)
        if problem and problem[0] not in rules.NOT_OBSERVED:
            raise _reject(*problem)  # a record we will never co-sign; one we cannot judge yet waits
        self._pending_ledger = apply_tx(self.pending_ledger, tx, txid)
        self.pending[txid] = (raw, signature)
        return self._maybe_request(now_ms)

    def _record_problem(self, tx: Tx) -> tuple[str, str] | None:
        """Why we would not co-sign this RoundResult or ScoreReport (head_rules); None
        for a record we agree with and for every other kind of transaction."""
        ledger = self.confirmed.ledger if self.confirmed is not None else None
        if isinstance(tx, mb.MEMBER_TXS):
            # At most one per snapshot (_ready_txs), so the confirmed ledger is the one it applies to.
            return None if ledger is None else mb.record_problem(tx, ledger, self.membership)
        if isinstance(tx, RoundResult) and ledger is not None and tx.round < ledger.rounds_below:
            # Checked first: its own view may be pruned, and it must not wait for one.
            return rules.window_problem(ledger.rounds_below, (), tx.round, "round")
        if isinstance(tx, ScoreReport) and ledger is not None and tx.epoch < ledger.epochs_below:
            return rules.window_problem(ledger.epochs_below, (), tx.epoch, "epoch")
        if isinstance(tx, RoundResult):
            return rules.round_result_problem(tx, self.parameters, self.observed_rounds)
        if isinstance(tx, ScoreReport):
            return rules.score_report_problem(tx, self.parameters, self.observed_epochs)
        return None

    def _check_tx_signature(self, tx: Tx, raw: bytes, signature: bytes) -> None:
        if tx.author not in self.parameters.parties:
            raise _reject("unknown_author", f"{tx.author} is not a party of this head")
        if not self.verify(tx.author, tx_signing_payload(self.parameters.head_id, tx_id(raw)),
                           signature):
            raise _reject("bad_tx_signature", f"transaction {tx_id(raw)[:12]} is not signed by its author")

    def _count_vote(self, vote: SlashVote, raw: bytes, signature: bytes) -> list[Effect]:
        self._require("SlashVote", local=False)
        if vote.target not in self.parameters.parties:
            raise _reject("unknown_target", f"{vote.target} is not a party of this head")
        voters = self.votes.setdefault(vote.target, {})
        if vote.author in voters:
            return []  # one vote per voter and target; repeats change nothing
        was_slashed = vote.target in self.slashed()
        voters[vote.author] = (raw, signature)
        effects: list[Effect] = [Record("slash_vote", {"voter": vote.author, "target": vote.target,
                                                       "grounds": vote.grounds})]
        if not was_slashed and vote.target in self.slashed():
            effects.append(Record("slashed", {"party": vote.target, "voters": sorted(voters)}))
        return effects

    def _cast_vote(self, target: str, grounds: str, evidence: int) -> list[Effect]:
        if self.me in self.votes.get(target, {}):
            return []
        raw = encode_tx(SlashVote(self.me, target, grounds, evidence))
        signature = self.signer.sign(tx_signing_payload(self.parameters.head_id, tx_id(raw)))
        return ([Send(HeadNewTx(self.parameters.head_id, raw, signature))]
                + self._count_vote(SlashVote(self.me, target, grounds, evidence), raw, signature))

    # -- snapshots: ReqSn, AckSn -------------------------------------------------------

    def _maybe_request(self, now_ms: int) -> list[Effect]:
        """ReqSn: the next snapshot's leader proposes it once there is something to settle."""
        if self.phase != Phase.OPEN or self.proposal is not None or self.confirmed is None:
            return []
        number = self.confirmed.number + 1
        if self.parameters.leader(number) != self.me:
            return []
        txs = self._ready_txs()
        deposit_id = next((d for d, r in self.deposits.items() if r.includable_in(number)), "")
        if not txs and not deposit_id:
            return []
        ledger = self._ledger_after(txs, deposit_id)
        proposal = Proposal(number, txs, deposit_id, ledger, now_ms)
        return [Send(proposal.request(self.parameters.head_id))] + self._sign(proposal)

    def _ready_txs(self) -> tuple[tuple[bytes, bytes], ...]:
        """The pending txs a leader proposes: in arrival order, those we would co-sign now
        (a record waits for our own view of its round) and that still apply after them."""
        assert self.confirmed is not None
        ledger, chosen = self.confirmed.ledger, []
        for txid, (raw, signature) in self.pending.items():
            if len(chosen) == MAX_SNAPSHOT_TXS:
                break
            tx = decode_tx(raw)
            if self._record_problem(tx) is not None:
                continue
            if isinstance(tx, mb.MEMBER_TXS) and any(
                    isinstance(decode_tx(r), mb.MEMBER_TXS) for r, _ in chosen):
                continue  # one membership record per snapshot: the next one takes it
            try:
                ledger = apply_tx(ledger, tx, txid)
            except RemoteProtocolError:
                continue
            chosen.append((raw, signature))
        return tuple(chosen)

    def _on_req_sn(self, sender: str, message: HeadReqSn, now_ms: int) -> list[Effect]:
        self._require("ReqSn", local=False)
        assert self.confirmed is not None
        number = message.number
        if number <= self.confirmed.number:
            raise _reject("stale_snapshot", f"snapshot {number} is not newer than the confirmed "
                          f"{self.confirmed.number}")
        if sender != self.parameters.leader(number):
            raise _reject("not_leader", f"{sender} does not lead snapshot {number}")
        if self.proposal is not None and self.proposal.number == number:
            if message == self.proposal.request(self.parameters.head_id):
                return []  # the same request again
            if self.refused(self.me, number):
                return []
            # The leader equivocated. We signed its other request, and gossip brings this one
            # to everyone: our signed refusal tells those who signed this one that we are not
            # withholding (else they and the leader would outvote us; found by TLC).
            return self._refuse(number, "conflicting_snapshot",
                                f"{sender} proposed two different snapshots {number}")
        if number > self.confirmed.number + 1:  # we are behind: catch up, then sign it
            self.waiting = message
            return [Send(HeadSyncRequest(self.parameters.head_id, self.confirmed.number))]
        try:
            proposal = self._checked_request(message, now_ms)
        except AwaitingOwnView as exc:
            self.waiting = message
            return ([Record("awaiting_own_view", {"number": number, "reason": exc.reason})]
                    + self._refuse(number, exc.reason, exc.hint))
        except RemoteProtocolError as exc:
            return self._refuse(number, exc.reason, exc.hint)
        return self._sign(proposal)

    def _refuse(self, number: int, reason: str, hint: str) -> list[Effect]:
        """NackSn: say, signed, why we do not sign snapshot `number`, so that nobody takes
        our silence for withholding. The request itself changes nothing else here."""
        signature = self.signer.sign(refusal_signing_payload(self.parameters.head_id, number, reason))
        self.refusals[self.me] = (number, reason, signature)
        return [Send(HeadNackSn(self.parameters.head_id, number, reason, signature)),
                Record("refused", {"number": number, "reason": reason, "hint": hint})]

    def _on_nack_sn(self, sender: str, message: HeadNackSn, now_ms: int) -> list[Effect]:
        self._require("NackSn", local=False)
        assert self.confirmed is not None
        if message.number <= self.confirmed.number:
            return []  # a refusal of a snapshot that was confirmed after all
        if not _REASON.fullmatch(message.reason):
            raise _reject("malformed_refusal", "a refusal's reason is a short snake_case word")
        payload = refusal_signing_payload(self.parameters.head_id, message.number, message.reason)
        if not self.verify(sender, payload, message.signature):
            raise _reject("bad_refusal_signature", f"{sender}'s refusal of snapshot "
                          f"{message.number} is not signed by it")
        if self.refusals.get(sender, (-1,))[0] >= message.number:
            return []
        self.refusals[sender] = (message.number, message.reason, message.signature)
        return [Record("refusal", {"party": sender, "number": message.number,
                                   "reason": message.reason})]

    def refused(self, party: str, number: int) -> bool:
        """`party` signed a refusal of snapshot `number`: it is not withholding it."""
        return self.refusals.get(party, (-1,))[0] == number

    def _checked_request(self, message: HeadReqSn, now_ms: int) -> Proposal:
        """The proposal a ReqSn makes, if its txs are signed and valid in its order on our
        confirmed ledger and give the ledger hash it claims."""
        if len(message.txs) != len(message.signatures) or len(message.txs) > MAX_SNAPSHOT_TXS:
            raise _reject("malformed_request", "a ReqSn has one signature per transaction")
        txs = tuple(zip(message.txs, message.signatures))
        if sum(isinstance(_decoded_or_none(raw), mb.MEMBER_TXS) for raw, _ in txs) > 1:
            raise _reject("one_membership_record_per_snapshot", f"snapshot {message.number} holds "
                          "more than one membership record")
        for raw, signature in txs:
            try:
                tx = decode_tx(raw)
                self._check_tx_signature(tx, raw, signature)
            except RemoteProtocolError as exc:
                raise _reject("invalid_snapshot_tx", f"snapshot {message.number}: {exc.hint}") from None
            problem = self._record_problem(tx)
            if problem and problem[0] in rules.NOT_OBSERVED:
                raise AwaitingOwnView(f"snapshot {message.number}: {problem[1]}", reason=problem[0])
            if problem:
                raise _reject(problem[0], f"snapshot {message.number}: {problem[1]}")
        self._check_deposit_includable(message.deposit_id, message.number)
        try:
            ledger = self._ledger_after(txs, message.deposit_id)
        except RemoteProtocolError as exc:
            raise _reject("invalid_snapshot_tx", f"snapshot {message.number}: {exc.hint}") from None
        if ledger.hash() != message.ledger_hash:
            raise _reject("ledger_hash_mismatch", f"snapshot {message.number}'s ledger hash is not "
                          "the result of its transactions")
        return Proposal(message.number, txs, message.deposit_id, ledger, now_ms)

    def _retry_waiting(self, now_ms: int) -> list[Effect]:
        """After catching up, sign the ReqSn that came while we were behind. Its
        rejection must not fail the event that caught us up, so it becomes a record."""
        message, self.waiting = self.waiting, None
        if message is None or self.confirmed is None or message.number != self.confirmed.number + 1:
            return []
        if self.proposal is not None and self.proposal.number == message.number:
            return []  # we signed another request for this number since: never two
        try:
            return self._sign(self._checked_request(message, now_ms))
        except AwaitingOwnView as exc:
            self.waiting = message  # still not ours to judge: keep waiting
            if self.refused(self.me, message.number):
                return []
            return self._refuse(message.number, exc.reason, exc.hint)
        except RemoteProtocolError as exc:
            return self._refuse(message.number, exc.reason, exc.hint)

    def _check_deposit_includable(self, deposit_id: str, number: int) -> None:
        if not deposit_id:
            return
        record = self.deposits.get(deposit_id)
        if record is None:  # its Deposit message has not reached us yet: wait for it
            raise AwaitingOwnView(f"deposit {deposit_id[:12]} has not reached this party yet",
                                  reason="deposit_not_seen")
        if not record.includable_in(number):
            raise _reject("deposit_not_includable", f"deposit {deposit_id[:12]} is {record.status} "
                          f"and may be absorbed up to snapshot {record.last_snapshot}, not {number}")

    def _ledger_after(self, txs: tuple[tuple[bytes, bytes], ...], deposit_id: str) -> Ledger:
        assert self.confirmed is not None
        ledger = self.confirmed.ledger
        for raw, _ in txs:
            ledger = apply_tx(ledger, decode_tx(raw), tx_id(raw))
        if deposit_id:
            record = self.deposits[deposit_id]
            ledger = apply_deposit(ledger, deposit_id, record.party, record.amount)
        return ledger

    def _sign(self, proposal: Proposal) -> list[Effect]:
        """AckSn: sign a snapshot we checked, then count the acks that came early."""
        number, now_ms = proposal.number, proposal.requested_at_ms
        payload = proposal.payload(self.parameters.head_id)
        signature = self.signer.sign(payload)
        proposal.acks[self.me] = signature
        for party, early in sorted(self.early_acks.items()):
            if party != self.me and self.verify(party, payload, early):
                proposal.acks[party] = early  # a bad early ack is dropped; its party counts as missing
        self.early_acks = {}
        self.proposal = proposal
        effects: list[Effect] = [
            Send(HeadAckSn(self.parameters.head_id, number, signature)),
            SetTimer(now_ms + self.parameters.sign_timeout_ms, "snapshot_signatures")]
        return effects + self._maybe_confirm(now_ms)

    def _on_ack_sn(self, sender: str, message: HeadAckSn, now_ms: int) -> list[Effect]:
        self._require("AckSn", local=False)
        assert self.confirmed is not None
        if message.number <= self.confirmed.number:
            return []  # a late ack of a snapshot we already confirmed
        proposal = self.proposal
        if proposal is None or proposal.number != message.number:
            if message.number == self.confirmed.number + 1:
                self.early_acks.setdefault(sender, message.signature)
                return []
            return [Send(HeadSyncRequest(self.parameters.head_id, self.confirmed.number))]
        if sender in proposal.acks:
            return []
        if not self.verify(sender, proposal.payload(self.parameters.head_id), message.signature):
            raise _reject("bad_snapshot_signature", f"{sender}'s signature is not on snapshot "
                          f"{message.number} as we computed it")
        proposal.acks[sender] = message.signature
        return self._maybe_confirm(now_ms)

    def _maybe_confirm(self, now_ms: int) -> list[Effect]:
        proposal = self.proposal
        if proposal is None or set(proposal.acks) != set(self.parameters.parties):
            return []
        snapshot = Snapshot(proposal.number, proposal.tx_ids, proposal.deposit_id, proposal.ledger,
                            dict(sorted(proposal.acks.items())))
        return self._adopt(snapshot) + self._maybe_request(now_ms)

    def _adopt(self, snapshot: Snapshot) -> list[Effect]:
        """Make a fully signed snapshot the confirmed one (after AckSn or Sync)."""
        effects: list[Effect] = [Record("snapshot_confirmed", {
            "number": snapshot.number, "tx_ids": list(snapshot.tx_ids),
            "deposit_id": snapshot.deposit_id, "ledger_hash": snapshot.ledger.hash()})]
        known = dict(self.pending)
        if self.proposal is not None:
            known.update((tx_id(raw), (raw, sig)) for raw, sig in self.proposal.txs)
        for txid in snapshot.tx_ids:
            if txid in known:
                effects.extend(_settled_records(decode_tx(known[txid][0]), txid, snapshot.number))
        for deposit_id in snapshot.ledger.deposits:
            record = self.deposits.get(deposit_id)
            if record is not None and record.status == "pending":
                record.status = "absorbed"
                effects.append(Record("deposit_absorbed", {"deposit_id": deposit_id,
                                                           "party": record.party,
                                                           "amount": record.amount}))
        self.confirmed = snapshot
        for txid in snapshot.tx_ids + snapshot.ledger.applied:
            self.pending.pop(txid, None)
        self._prune_views()
        self._rebuild_pending()  # drops what a skipped-over snapshot settled (Sync)
        if self.proposal is not None and self.proposal.number <= snapshot.number:
            self.proposal = None
        self.early_acks = {}
        self.refusals = {p: r for p, r in self.refusals.items() if r[0] > snapshot.number}
        return effects

    def _rebuild_pending(self) -> None:
        """Re-apply pending txs on the confirmed ledger; drop those that no longer apply."""
        assert self.confirmed is not None
        ledger = self.confirmed.ledger
        for txid, (raw, _) in list(self.pending.items()):
            tx = decode_tx(raw)
            problem = self._record_problem(tx)
            if problem and problem[0] not in rules.NOT_OBSERVED:
                del self.pending[txid]  # our own view came and disagrees: never co-signed
                continue
            try:
                ledger = apply_tx(ledger, tx, txid)
            except RemoteProtocolError:
                del self.pending[txid]
        self._pending_ledger = ledger

    # -- our own view: ObserveRound, ObserveEpoch --------------------------------------

    def _observe_round(self, event: ObserveRound) -> list[Effect]:
        limit = None if self.params is None else self.params.round_limit
        below = self.confirmed.ledger.rounds_below if self.confirmed else 0
        if event.round >= below:  # a view of a round that can no longer settle is not kept
            self._keep_view(self.observed_rounds, event.round,
                            rules.round_view(event.adapter_id, event.contributors), "round", limit)
        return self._after_own_view(event.now_ms)

    def _observe_epoch(self, event: ObserveEpoch) -> list[Effect]:
        limit = None if self.params is None else self.params.epoch_limit
        scores = {k: float(v) for k, v in sorted(event.scores.items())}
        if event.epoch >= (self.confirmed.ledger.epochs_below if self.confirmed else 0):
            self._keep_view(self.observed_epochs, event.epoch, scores, "epoch", limit)
        return self._after_own_view(event.now_ms)

    def _prune_views(self) -> None:
        """Forget our views of records under the confirmed window, which can never be
        co-signed again, once more than VIEWS_KEPT are held: the state stays bounded
        (issue 12). Until then RewardsOnlyByRule can still check every settled record."""
        assert self.confirmed is not None
        ledger = self.confirmed.ledger
        for seen, below, attr in ((self.observed_rounds, ledger.rounds_below, "views_pruned_rounds"),
                                  (self.observed_epochs, ledger.epochs_below, "views_pruned_epochs")):
            if len(seen) <= VIEWS_KEPT:
                continue
            for number in [n for n in seen if n < below]:
                del seen[number]
            setattr(self, attr, max(getattr(self, attr), below))

    @staticmethod
    def _keep_view(seen: dict[int, Any], number: int, view: Any, what: str, limit: int | None) -> None:
        if limit is not None and not 0 <= number < limit:
            raise HeadMisuse(f"{what} {number} is outside the head's agreed {what}s 0..{limit - 1}",
                             reason=f"{what}_out_of_range")
        if seen.get(number, view) != view:
            raise HeadMisuse(f"{what} {number} was already observed with other contents",
                             reason="conflicting_observation")
        seen[number] = view

    def _after_own_view(self, now_ms: int) -> list[Effect]:
        """A request that waited for this view can be judged now; as leader, a record
        that waited for it can be proposed."""
        if self.phase != Phase.OPEN or self.confirmed is None:
            return []
        self._rebuild_pending()
        return self._retry_waiting(now_ms) + self._maybe_request(now_ms)

    # -- catching up: Restart, Sync ----------------------------------------------------

    def _restart(self, event: Restart) -> list[Effect]:
        if self.phase != Phase.OPEN or self.confirmed is None:
            return []
        if self.proposal is not None:
            # Acks that came while we were down are lost: restart the signature clock so
            # nobody is blamed for our outage, and ask for what the others confirmed.
            self.proposal.requested_at_ms = event.now_ms
        return [Send(HeadSyncRequest(self.parameters.head_id, self.confirmed.number))]

    def _on_sync_request(self, sender: str, message: HeadSyncRequest, now_ms: int) -> list[Effect]:
        self._require("Sync", local=False)
        assert self.confirmed is not None
        if self.confirmed.number > message.confirmed_number:
            return [Send(HeadSync(self.parameters.head_id, self.confirmed.encode()))]
        proposal = self.proposal
        own = self.refusals.get(self.me)
        if proposal is None and own is not None and own[0] == message.confirmed_number + 1:
            return [Send(HeadNackSn(self.parameters.head_id, *own))]  # it may have lost our refusal
        if proposal is None or proposal.number != message.confirmed_number + 1:
            return []
        # The requester may have lost the snapshot in flight: the leader sends its request
        # again, and every party its own AckSn, so nobody is blamed for an outage.
        head_id = self.parameters.head_id
        effects: list[Effect] = []
        if self.parameters.leader(proposal.number) == self.me:
            effects.append(Send(proposal.request(head_id)))
        return effects + [Send(HeadAckSn(head_id, proposal.number, proposal.acks[self.me]))]

    def _on_sync(self, sender: str, message: HeadSync, now_ms: int) -> list[Effect]:
        self._require("Sync", local=False)
        assert self.confirmed is not None
        snapshot = Snapshot.decode(message.snapshot)
        if snapshot.number <= self.confirmed.number:
            return []
        self._check_fully_signed(snapshot)
        return self._adopt(snapshot) + self._retry_waiting(now_ms) + self._maybe_request(now_ms)

    def _check_fully_signed(self, snapshot: Snapshot) -> None:
        problem = snapshot_problem(snapshot, self.parameters, self._initial_ledger(), self.verify)
        if problem:
            raise _reject(*problem)

    def _initial_ledger(self) -> Ledger:
        balances = {p: b for p, (_, b, _) in self.commits.items()}
        balances[POOL] = sum(pool for _, _, pool in self.commits.values())
        return Ledger(balances)

    # -- deposits: Deposit, Recover ----------------------------------------------------

    def _deposit(self, event: Deposit) -> list[Effect]:
        self._require("Deposit", local=True)
        if event.amount <= 0:
            raise HeadMisuse("a deposit is a positive amount", reason="bad_deposit")
        deposit_id = self.deposit_id(self.me, event.amount, event.nonce)
        if deposit_id in self.deposits:
            raise HeadMisuse("this deposit was already made; use another nonce",
                             reason="duplicate_deposit")
        assert self.confirmed is not None
        last = self.confirmed.number + self.parameters.deposit_period_snapshots
        self.deposits[deposit_id] = DepositRecord(self.me, event.amount, last)
        return [Send(HeadDeposit(self.parameters.head_id, deposit_id, event.amount, event.nonce,
                                 last)),
                Record("deposit", {"deposit_id": deposit_id, "party": self.me,
                                   "amount": event.amount, "last_snapshot": last})
                ] + self._maybe_request(event.now_ms)

    def deposit_id(self, party: str, amount: int, nonce: int) -> str:
        return _sha256(canonical(["sealmesh/head/deposit", self.parameters.head_id, party, amount,
                                  nonce]))

    def _on_deposit(self, sender: str, message: HeadDeposit, now_ms: int) -> list[Effect]:
        self._require("Deposit", local=False)
        if message.amount <= 0 or message.deposit_id != self.deposit_id(sender, message.amount,
                                                                          message.nonce):
            raise _reject("bad_deposit", "a deposit's id is the hash of its party, amount and nonce")
        assert self.confirmed is not None
        # The depositor counts from its confirmed snapshot, which may be a little behind or
        # ahead of ours; a window further out would only keep its own funds locked longer.
        period = self.parameters.deposit_period_snapshots
        if not 1 <= message.last_snapshot <= self.confirmed.number + 2 * period:
            raise _reject("bad_deposit_window", f"a deposit may be absorbed for {period} snapshots "
                          f"from the depositor's confirmed one, not up to {message.last_snapshot}")
        if message.deposit_id in self.deposits:
            return []
        self.deposits[message.deposit_id] = DepositRecord(sender, message.amount,
                                                          message.last_snapshot)
        return ([Record("deposit", {"deposit_id": message.deposit_id, "party": sender,
                                    "amount": message.amount, "last_snapshot": message.last_snapshot})]
                + self._retry_waiting(now_ms) + self._maybe_request(now_ms))

    def _recover(self, event: Recover) -> list[Effect]:
        self._require("Recover", local=True)
        problem = self._recover_problem(self.me, event.deposit_id, event.now_ms)
        if problem:
            raise HeadMisuse(problem[1], reason=problem[0])
        return ([Send(HeadRecover(self.parameters.head_id, event.deposit_id))]
                + self._apply_recover(event.deposit_id))

    def _on_recover(self, sender: str, message: HeadRecover, now_ms: int) -> list[Effect]:
        self._require("Recover", local=False)
        problem = self._recover_problem(sender, message.deposit_id, now_ms)
        if problem:
            raise _reject(*problem)
        return self._apply_recover(message.deposit_id)

    def _recover_problem(self, party: str, deposit_id: str, now_ms: int) -> tuple[str, str] | None:
        record = self.deposits.get(deposit_id)
        if record is None:
            return ("unknown_deposit", f"no deposit {deposit_id[:12]}")
        if record.party != party:
            return ("not_depositor", "only the depositor recovers a deposit")
        if record.status != "pending":
            return ("deposit_" + record.status, f"deposit {deposit_id[:12]} is {record.status}")
        if self.closing and deposit_id in self.closing.snapshot.ledger.deposits:
            return ("deposit_absorbed", "the closed snapshot absorbed this deposit")
        if self.phase in (Phase.FANOUT_POSSIBLE, Phase.FINAL):
            return None  # the head settled without it
        # Each snapshot number is confirmed once, with every party's signature: once ours
        # reaches the deposit's last snapshot without it, no snapshot can still absorb it.
        assert self.confirmed is not None
        if self.confirmed.number < record.last_snapshot:
            return ("deposit_not_expired", f"deposit {deposit_id[:12]} may still be absorbed up to "
                    f"snapshot {record.last_snapshot}; {self.confirmed.number} is confirmed")
        if deposit_id in self.confirmed.ledger.deposits:
            return ("deposit_absorbed", "the confirmed snapshot absorbed this deposit")
        return None

    def _apply_recover(self, deposit_id: str) -> list[Effect]:
        record = self.deposits[deposit_id]
        record.status = "recovered"
        return [Record("deposit_recovered", {"deposit_id": deposit_id, "party": record.party,
                                             "amount": record.amount})]

    # -- Close, Contest, Tick, Fanout --------------------------------------------------

    def _close(self, event: Close) -> list[Effect]:
        self._require("Close", local=True)
        if self.phase == Phase.CLOSED:
            raise HeadMisuse("the head is already closed", reason="wrong_phase")
        assert self.confirmed is not None
        excuse = self._excuse()
        # The ledger keeps a count, not every id; each counted round was in the agreed
        # range, as every party checked it (head_rules) before signing its snapshot.
        done = self.confirmed.ledger.rounds_settled
        if done < self.parameters.agreed_rounds and not excuse:
            raise HeadMisuse(
                f"{done} of the agreed {self.parameters.agreed_rounds} rounds are settled; closing "
                "now gets this validator slashed. Wait for the rounds, or for a majority vote "
                "against a party that withholds its signature", reason="early_close")
        closing = Closing(self.confirmed, event.now_ms, self.me)
        message = HeadClose(self.parameters.head_id, self.confirmed.encode(), event.now_ms, excuse)
        return [Send(message)] + self._apply_close(closing)

    def _excuse(self) -> list[bytes]:
        """Signed withholding votes against a slashed party: they justify an early close."""
        for target in self.slashed():
            votes = [canonical([raw, sig]) for raw, sig in self.votes[target].values()
                     if decode_tx(raw).grounds == "withheld_signature"]
            if len(votes) >= self.parameters.majority:
                return votes
        return []

    def _excused(self, excuse: list[bytes], closer: str) -> bool:
        voters_by_target: dict[str, set[str]] = {}
        for item in excuse:
            try:
                raw, signature = unpack_strict(item)
                vote = decode_tx(raw)
            except (RemoteProtocolError, ValueError, TypeError, msgpack.UnpackException):
                continue
            if (isinstance(vote, SlashVote) and vote.grounds == "withheld_signature"
                    and vote.author in self.parameters.parties and vote.target != closer
                    and self.verify(vote.author, tx_signing_payload(self.parameters.head_id,
                                                                    tx_id(raw)), signature)):
                voters_by_target.setdefault(vote.target, set()).add(vote.author)
        return any(len(v) >= self.parameters.majority for v in voters_by_target.values())

    def _on_close(self, sender: str, message: HeadClose, now_ms: int) -> list[Effect]:
        self._require("Close", local=False)
        if self.closing is not None and now_ms >= self.closing.deadline(self.parameters):
            # Like a late Contest: past the deadline the closed snapshot is final here, so a
            # newer one must not reach this party alone (found by TLC on specs/Head.tla).
            raise _reject("close_after_deadline", "the contestation period is over")
        if abs(message.closed_at_ms - now_ms) > CLOCK_SKEW_MS:
            raise _reject("stale_close", f"closed_at is {message.closed_at_ms - now_ms} ms from "
                          f"our clock; the bound is {CLOCK_SKEW_MS}")
        snapshot = Snapshot.decode(message.snapshot)
        self._check_fully_signed(snapshot)
        assert self.confirmed is not None
        newest = max(self.confirmed, snapshot, key=lambda s: s.number)
        effects: list[Effect] = []
        done = newest.ledger.rounds_settled
        if done < self.parameters.agreed_rounds and not self._excused(message.excuse, sender):
            effects += self._cast_vote(sender, "early_close", snapshot.number)
        if snapshot.number > self.confirmed.number:
            effects += self._adopt(snapshot)  # fully signed, so ours too
        closing = Closing(snapshot, message.closed_at_ms, sender)
        if self.closing is not None:
            # Concurrent closes: the earliest sets the deadline, the newest snapshot wins.
            first = min(self.closing, closing, key=lambda c: (c.closed_at_ms, c.closer))
            closing = Closing(max(self.closing.snapshot, snapshot, key=lambda s: s.number),
                              first.closed_at_ms, first.closer)
        return effects + self._apply_close(closing)

    def _apply_close(self, closing: Closing) -> list[Effect]:
        self.closing = closing
        self.proposal, self.waiting, self.early_acks = None, None, {}
        self._move("Close", Phase.CLOSED)
        deadline = closing.deadline(self.parameters)
        return [Record("closed", {"by": closing.closer, "number": closing.snapshot.number,
                                  "deadline_ms": deadline}),
                SetTimer(deadline, "contestation_deadline")] + self._maybe_contest()

    def _maybe_contest(self) -> list[Effect]:
        """Contest: answer a close on an older snapshot with our newer confirmed one."""
        closing, confirmed = self.closing, self.confirmed
        assert closing is not None and confirmed is not None
        if confirmed.number <= closing.snapshot.number:
            return []
        closing.snapshot = confirmed  # our own contest counts here as it does everywhere else
        return [Send(HeadContest(self.parameters.head_id, confirmed.encode())),
                Record("contested", {"by": self.me, "number": confirmed.number})]

    def _on_contest(self, sender: str, message: HeadContest, now_ms: int) -> list[Effect]:
        self._require("Contest", local=False)
        if self.phase == Phase.OPEN:
            return self._contest_before_close(message)
        assert self.closing is not None
        if now_ms >= self.closing.deadline(self.parameters):
            raise _reject("contest_after_deadline", "the contestation period is over")
        snapshot = Snapshot.decode(message.snapshot)
        if snapshot == self.closing.snapshot:
            return []  # another party contested with the same snapshot as we did
        if snapshot.number <= self.closing.snapshot.number:
            raise _reject("contest_not_newer", f"snapshot {snapshot.number} is not newer than the "
                          f"closed {self.closing.snapshot.number}")
        self._check_fully_signed(snapshot)
        assert self.confirmed is not None
        effects = self._adopt(snapshot) if snapshot.number > self.confirmed.number else []
        self.closing.snapshot = snapshot
        self._move("Contest", Phase.CLOSED)
        return effects + [Record("contested", {"by": sender, "number": snapshot.number})] + \
            self._maybe_contest()

    def _contest_before_close(self, message: HeadContest) -> list[Effect]:
        """A Contest overtook the Close it answers. Its snapshot is fully signed, so it is
        authoritative: confirm it now, and the Close, when it comes, finds it ours."""
        assert self.confirmed is not None
        snapshot = Snapshot.decode(message.snapshot)
        if snapshot.number <= self.confirmed.number:
            return []
        self._check_fully_signed(snapshot)
        return self._adopt(snapshot)

    def _tick(self, event: Tick) -> list[Effect]:
        effects: list[Effect] = []
        if self.phase == Phase.OPEN and self.proposal is not None and event.now_ms >= (
                self.proposal.requested_at_ms + self.parameters.sign_timeout_ms):
            for party in self.parameters.parties:
                if party not in self.proposal.acks and not self.refused(party, self.proposal.number):
                    effects += self._cast_vote(party, "withheld_signature", self.proposal.number)
        if self.phase == Phase.OPEN:
            effects += self._maybe_request(event.now_ms)
        if self.phase == Phase.CLOSED and self.closing is not None and (
                event.now_ms >= self.closing.deadline(self.parameters)):
            self._move("Tick", Phase.FANOUT_POSSIBLE)
            effects.append(Record("fanout_possible", {"number": self.closing.snapshot.number}))
        return effects

    def _fanout(self, event: Fanout) -> list[Effect]:
        effects = self._tick(Tick(event.now_ms)) if self.phase == Phase.CLOSED else []
        if self.phase == Phase.CLOSED:
            raise HeadMisuse(f"fanout waits for the contestation deadline at {self.deadline_ms()} ms",
                             reason="wrong_phase")
        self._require("Fanout", local=True)
        assert self.closing is not None
        escrows = {p: e for p, (e, _, _) in self.commits.items()}
        self.payouts = final_payouts(self.closing.snapshot.ledger, escrows, self.slashed())
        self._move("Fanout", Phase.FINAL)
        return effects + [Record("fanout", {"number": self.closing.snapshot.number,
                                            "payouts": dict(self.payouts),
                                            "slashed": self.slashed()})]

    # -- received messages -------------------------------------------------------------

    def _receive(self, sender: str, message: HeadMessage, now_ms: int) -> list[Effect]:
        handler = _RECEIVERS.get(type(message))
        if handler is None:
            raise _reject("unknown_type", f"{type(message).__name__} is not a head message")
        if not isinstance(message, HeadInit):
            if self.params is None and isinstance(message, (HeadCommit, HeadAbort)):
                return self._keep_early(sender, message)
            if self.params is None:
                raise _reject("wrong_phase", "no head was initialized here")
            if message.head_id != self.params.head_id:
                raise _reject("wrong_head", f"message for head {message.head_id!r}, not ours")
            if sender not in self.params.parties:
                raise _reject("not_a_party", f"{sender} is not a party of this head")
        return handler(self, sender, message, now_ms)

    # -- persistence -------------------------------------------------------------------

    def to_wire(self) -> dict[str, Any]:
        """All state, as plain msgpack-able data: what storage keeps and what tests hash."""
        p = self.proposal
        c = self.closing
        return {
            "phase": self.phase.value,
            "params": None if self.params is None else _params_wire(self.params),
            "commits": {k: list(v) for k, v in self.commits.items()},
            "confirmed": None if self.confirmed is None else self.confirmed.to_wire(),
            "pending": [[k, raw, sig] for k, (raw, sig) in self.pending.items()],
            "proposal": None if p is None else [p.number, [list(t) for t in p.txs], p.deposit_id,
                                                p.ledger.to_wire(), p.requested_at_ms, dict(p.acks)],
            "waiting": None if self.waiting is None else [
                self.waiting.number, list(self.waiting.txs), list(self.waiting.signatures),
                self.waiting.deposit_id, self.waiting.ledger_hash],
            "early_acks": dict(self.early_acks),
            "refusals": {p: list(r) for p, r in sorted(self.refusals.items())},
            "deposits": [[k, r.party, r.amount, r.last_snapshot, r.status]
                         for k, r in self.deposits.items()],
            "closing": None if c is None else [c.snapshot.to_wire(), c.closed_at_ms, c.closer],
            "votes": {t: {v: list(x) for v, x in sorted(vs.items())}
                      for t, vs in sorted(self.votes.items())},
            "payouts": self.payouts,
            "early": [list(e) for e in self.early],
            "observed_rounds": [[r, v] for r, v in sorted(self.observed_rounds.items())],
            "observed_epochs": [[e, v] for e, v in sorted(self.observed_epochs.items())],
            "views_pruned": [self.views_pruned_rounds, self.views_pruned_epochs],
        }

    @classmethod
    def from_wire(cls, wire: dict[str, Any], signer: Signer, *,
                  verify: Verify = verify_signature) -> "HeadMachine":
        machine = cls(signer, verify=verify)
        machine.phase = Phase(wire["phase"])
        if wire["params"] is not None:
            w = dict(wire["params"])
            w["parties"] = tuple(w["parties"])
            machine.params = HeadParameters(**w)
        machine.commits = {k: tuple(v) for k, v in wire["commits"].items()}  # type: ignore[misc]
        if wire["confirmed"] is not None:
            machine.confirmed = Snapshot.from_wire(wire["confirmed"])
        machine.pending = {k: (raw, sig) for k, raw, sig in wire["pending"]}
        if wire["proposal"] is not None:
            n, txs, dep, ledger, at, acks = wire["proposal"]
            machine.proposal = Proposal(n, tuple((raw, sig) for raw, sig in txs), dep,
                                        Ledger.from_wire(ledger), at, dict(acks))
        if wire["waiting"] is not None:
            n, txs, sigs, dep, lh = wire["waiting"]
            machine.waiting = HeadReqSn(machine.parameters.head_id, n, list(txs), list(sigs), dep, lh)
        machine.early_acks = dict(wire["early_acks"])
        machine.refusals = {p: (r[0], r[1], r[2]) for p, r in wire.get("refusals", {}).items()}
        machine.deposits = {k: DepositRecord(p, a, d, s) for k, p, a, d, s in wire["deposits"]}
        if wire["closing"] is not None:
            snap, at, closer = wire["closing"]
            machine.closing = Closing(Snapshot.from_wire(snap), at, closer)
        machine.votes = {t: {v: (x[0], x[1]) for v, x in vs.items()} for t, vs in wire["votes"].items()}
        machine.payouts = None if wire["payouts"] is None else dict(wire["payouts"])
        machine.early = [(sender, raw) for sender, raw in wire["early"]]
        machine.observed_rounds = {r: list(v) for r, v in wire.get("observed_rounds", [])}
        machine.observed_epochs = {e: dict(v) for e, v in wire.get("observed_epochs", [])}
        machine.views_pruned_rounds, machine.views_pruned_epochs = wire.get("views_pruned", [0, 0])
        if machine.confirmed is not None:
            machine._rebuild_pending()
        return machine

    def state_hash(self) -> str:
        return _sha256(canonical(self.to_wire()))


def _params_wire(params: HeadParameters) -> dict[str, Any]:
    return {f.name: (list(getattr(params, f.name)) if f.name == "parties" else getattr(params, f.name))
            for f in fields(params)}


_COMMANDS: dict[type, Callable[..., list[Effect]]] = {
    Init: HeadMachine._init,
    Commit: HeadMachine._commit,
    Abort: HeadMachine._abort,
    NewTx: HeadMachine._newtx,
    Deposit: HeadMachine._deposit,
    Recover: HeadMachine._recover,
    Close: HeadMachine._close,
    Fanout: HeadMachine._fanout,
    Tick: HeadMachine._tick,
    Restart: HeadMachine._restart,
    ObserveRound: HeadMachine._observe_round,
    ObserveEpoch: HeadMachine._observe_epoch,
}

_RECEIVERS: dict[type, Callable[..., list[Effect]]] = {
    HeadInit: HeadMachine._on_init,
    HeadCommit: HeadMachine._on_commit,
    HeadAbort: HeadMachine._on_abort,
    HeadNewTx: HeadMachine._on_new_tx,
    HeadReqSn: HeadMachine._on_req_sn,
    HeadAckSn: HeadMachine._on_ack_sn,
    HeadNackSn: HeadMachine._on_nack_sn,
    HeadDeposit: HeadMachine._on_deposit,
    HeadRecover: HeadMachine._on_recover,
    HeadClose: HeadMachine._on_close,
    HeadContest: HeadMachine._on_contest,
    HeadSyncRequest: HeadMachine._on_sync_request,
    HeadSync: HeadMachine._on_sync,
}


def _decoded_or_none(raw: bytes) -> Tx | None:
    try:
        return decode_tx(raw)
    except RemoteProtocolError:
        return None


def _settled_records(tx: Tx, txid: str, number: int) -> list[Effect]:
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


def snapshot_problem(snapshot: Snapshot, params: HeadParameters, initial: Ledger,
                     verify: Verify) -> tuple[str, str] | None:
    """Why a snapshot may not close, contest or sync a head; None when it is fully signed.

    Snapshot 0 is the head's opening state, which needs no signatures (as in Hydra) but
    must equal what the parties committed.
    """
    if snapshot.number == 0:
        if snapshot.ledger != initial or snapshot.tx_ids or snapshot.deposit_id:
            return ("bad_initial_snapshot", "snapshot 0 must be exactly the committed state")
        return None
    if set(snapshot.signatures) != set(params.parties):
        return ("not_fully_signed", f"snapshot {snapshot.number} is signed by "
                f"{len(snapshot.signatures)} of {len(params.parties)} parties")
    payload = snapshot.signing_payload(params.head_id)
    for party in params.parties:
        if not verify(party, payload, snapshot.signatures[party]):
            return ("bad_snapshot_signature", f"{party}'s signature on snapshot {snapshot.number} "
                    "does not verify")
    return None


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


# --- invariants (specs/Head.tla) ----------------------------------------------------


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


__all__ = [
    "Abort", "AwaitingOwnView", "CLOCK_SKEW_MS", "Close", "Commit", "Deposit", "Effect", "Event", "Fanout",
    "HeadMachine", "HeadMisuse", "HeadParameters", "INVARIANTS", "Init", "Ledger", "NewTx",
    "ObserveEpoch", "ObserveRound", "POOL", "Phase", "Receive", "Record", "Recover", "Restart", "RoundResult", "ScoreReport",
    "Send", "SetTimer", "SlashVote", "VIEWS_KEPT", "Withdraw", "Snapshot", "TRANSITIONS", "Tick", "Transfer", "Tx",
    "apply_deposit", "apply_tx", "canonical", "decode_tx", "encode_tx", "final_payouts",
    "snapshot_problem", "tx_id", "tx_signing_payload", "violated_invariants",
    "ContestEndsOnNewestConfirmed", "NoDoubleSpend", "OnlyFullySignedSnapshotCloses",
    "RewardsOnlyByRule", "SlashNeedsMajority", "TypeOK", "ValueConserved",
]
