"""The head's phases, the events a machine takes and the effects it returns, and the
table of phase changes (h11's style). Event names are the actions of specs/Head.tla."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Union

from protocol.head._parameters import HeadParameters
from protocol.head._transactions import Tx
from protocol.head_messages import HeadMessage


class Phase(str, enum.Enum):
    """hydra-node's HeadStatus."""

    IDLE = "Idle"
    INITIALIZING = "Initializing"
    OPEN = "Open"
    CLOSED = "Closed"
    FANOUT_POSSIBLE = "FanoutPossible"
    FINAL = "Final"


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
