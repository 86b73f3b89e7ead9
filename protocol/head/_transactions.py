"""Off-chain transactions of the head: their kinds, canonical encoding, id and strict
decoding. Every transaction conserves value; rewards come out of the POOL account."""

from __future__ import annotations

import functools
import typing
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Union

from protocol import member_book as mb
from protocol._wire import unpack_strict
from protocol.head._codec import canonical, conforms, sha256_hex
from protocol.head._errors import reject

POOL = "reward_pool"  # the ledger account rewards are paid from; not an SS58 address

SLASH_GROUNDS = ("early_close", "withheld_signature")


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
    return sha256_hex(raw)


def tx_signing_payload(head_id: str, txid: str) -> bytes:
    return canonical(["sealmesh/head/tx", head_id, txid])


@functools.lru_cache(maxsize=4096)  # pure, and ledgers re-apply the same pending txs often
def decode_tx(raw: bytes) -> Tx:
    """Strictly decode a transaction; only its canonical encoding is accepted."""
    try:
        wire = unpack_strict(raw)
    except Exception as exc:  # msgpack raises several unrelated types
        raise reject("malformed_tx", f"not a msgpack transaction: {exc}") from exc
    cls = TX_KINDS.get(wire.get("kind")) if isinstance(wire, dict) else None
    if cls is None:
        raise reject("malformed_tx", "a transaction is a map whose kind is one of "
                      f"{sorted(TX_KINDS)}")
    hints = _tx_field_types(cls)
    names = set(hints)
    if set(wire) != names | {"kind"}:
        raise reject("malformed_tx", f"{cls.KIND} needs exactly the fields {sorted(names)}")
    for name in names:
        if not conforms(wire[name], hints[name]):
            raise reject("malformed_tx", f"{cls.KIND}.{name}: expected {hints[name]}")
    tx = cls(**{name: wire[name] for name in names})
    if encode_tx(tx) != raw:
        raise reject("non_canonical_tx", "transaction bytes are not in canonical form")
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
            raise reject("malformed_tx", "each reward goes to a named account and is positive")
    elif isinstance(tx, Transfer):
        if tx.amount <= 0 or not tx.recipient or tx.recipient == POOL:
            raise reject("malformed_tx", "a transfer moves a positive amount to a named account")
    elif isinstance(tx, Withdraw):
        if tx.amount <= 0 or tx.author == POOL:
            raise reject("malformed_tx", "a withdraw takes a positive amount of the author's own")
    elif tx.grounds not in SLASH_GROUNDS or tx.target == tx.author:
        raise reject("malformed_tx", f"a slash vote names another party and one of {SLASH_GROUNDS}")
