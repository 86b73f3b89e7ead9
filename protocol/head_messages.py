"""Mesh messages of the settlement head (protocol/head/); registered with protocol.messages on import.

One message per TLA+ action that another party must see (specs/Head.tla). Every one
travels on the settle channel and only validators, the head's parties, may send it;
the head machine further checks that the sender is a party of *this* head.

Transactions and snapshots travel as canonical msgpack bytes (see protocol.head) so
that their ids and signatures are computed over exactly the bytes that were sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from protocol.membership import Role, SenderPolicy
from protocol.messages import Channel, Message, message_type

_VALIDATORS = SenderPolicy(roles=frozenset({Role.VALIDATOR}))


@dataclass(frozen=True)
class HeadMessage(Message):
    CHANNEL: ClassVar[Channel] = Channel.SETTLE
    POLICY: ClassVar[SenderPolicy] = _VALIDATORS
    MAX_BYTES: ClassVar[int] = 4096


@message_type
@dataclass(frozen=True)
class HeadInit(HeadMessage):
    """Init: the initiator names the parties and the head's parameters."""

    TYPE: ClassVar[str] = "head_init"

    head_id: str
    parties: list[str]
    contestation_period_ms: int
    deposit_period_snapshots: int
    sign_timeout_ms: int
    agreed_rounds: int
    escrow: int
    round_limit: int  # RoundResults may settle rounds 0..round_limit-1
    epoch_limit: int  # ScoreReports may settle epochs 0..epoch_limit-1
    round_reward: int  # what the pool pays per round, split by protocol/head_rules
    epoch_reward: int


@message_type
@dataclass(frozen=True)
class HeadCommit(HeadMessage):
    """Commit: a party locks its escrow, its opening balance and its share of the reward pool."""

    TYPE: ClassVar[str] = "head_commit"

    head_id: str
    escrow: int
    balance: int
    pool: int


@message_type
@dataclass(frozen=True)
class HeadAbort(HeadMessage):
    TYPE: ClassVar[str] = "head_abort"

    head_id: str


@message_type
@dataclass(frozen=True)
class HeadNewTx(HeadMessage):
    """NewTx: one signed off-chain transaction (RoundResult, ScoreReport, Transfer, SlashVote)."""

    TYPE: ClassVar[str] = "head_new_tx"
    MAX_BYTES: ClassVar[int] = 64 * 1024

    head_id: str
    tx: bytes
    signature: bytes


@message_type
@dataclass(frozen=True)
class HeadReqSn(HeadMessage):
    """ReqSn: the snapshot leader proposes the next snapshot.

    It carries the signed transactions themselves, not only their ids: a party that
    missed or refused one of them (it conflicted with another it saw first) can still
    check the leader's order against the confirmed ledger, so conflicting transactions
    never stall a snapshot.
    """

    TYPE: ClassVar[str] = "head_req_sn"
    MAX_BYTES: ClassVar[int] = 768 * 1024

    head_id: str
    number: int
    txs: list[bytes]  # canonical transactions, in the order they apply
    signatures: list[bytes]  # each author's signature, position by position
    deposit_id: str  # "" when the snapshot absorbs no deposit
    ledger_hash: str


@message_type
@dataclass(frozen=True)
class HeadAckSn(HeadMessage):
    """AckSn: a party's signature on the proposed snapshot."""

    TYPE: ClassVar[str] = "head_ack_sn"

    head_id: str
    number: int
    signature: bytes


@message_type
@dataclass(frozen=True)
class HeadNackSn(HeadMessage):
    """NackSn: a party's signed refusal to sign the proposed snapshot, and why.

    A party that states why it does not sign is not withholding: its refusal blocks the
    withheld_signature vote against it for this snapshot (issue 11, findings 2 and 6).
    It does not bind: a party waiting for its own view of a round signs once it comes.
    """

    TYPE: ClassVar[str] = "head_nack_sn"

    head_id: str
    number: int
    reason: str  # the machine's refusal reason, e.g. round_not_observed
    signature: bytes


@message_type
@dataclass(frozen=True)
class HeadDeposit(HeadMessage):
    """Deposit: an incremental commit into an open head.

    Snapshots up to last_snapshot may absorb it; once one numbered last_snapshot or later
    is confirmed without it, the depositor may take it back (issue 11, finding 6: the
    window is counted in snapshot numbers, so no party's clock decides inclusion).
    """

    TYPE: ClassVar[str] = "head_deposit"

    head_id: str
    deposit_id: str
    amount: int
    nonce: int
    last_snapshot: int


@message_type
@dataclass(frozen=True)
class HeadRecover(HeadMessage):
    """Recover: the depositor takes back a deposit that no snapshot absorbed in its window."""

    TYPE: ClassVar[str] = "head_recover"

    head_id: str
    deposit_id: str


@message_type
@dataclass(frozen=True)
class HeadClose(HeadMessage):
    """Close: a party closes the head with a fully signed snapshot.

    `excuse` holds signed SlashVotes against a withholding party; a majority of them
    excuses a close before the agreed round count.
    """

    TYPE: ClassVar[str] = "head_close"
    MAX_BYTES: ClassVar[int] = 512 * 1024

    head_id: str
    snapshot: bytes
    closed_at_ms: int
    excuse: list[bytes]


@message_type
@dataclass(frozen=True)
class HeadContest(HeadMessage):
    """Contest: a newer fully signed snapshot than the one the head was closed with."""

    TYPE: ClassVar[str] = "head_contest"
    MAX_BYTES: ClassVar[int] = 512 * 1024

    head_id: str
    snapshot: bytes


@message_type
@dataclass(frozen=True)
class HeadSyncRequest(HeadMessage):
    """A party that restarted (or fell behind) asks for any newer confirmed snapshot."""

    TYPE: ClassVar[str] = "head_sync_request"

    head_id: str
    confirmed_number: int


@message_type
@dataclass(frozen=True)
class HeadSync(HeadMessage):
    """Sync: a fully signed snapshot newer than the requester's."""

    TYPE: ClassVar[str] = "head_sync"
    MAX_BYTES: ClassVar[int] = 512 * 1024

    head_id: str
    snapshot: bytes


__all__ = [
    "HeadAbort", "HeadAckSn", "HeadClose", "HeadCommit", "HeadContest", "HeadDeposit", "HeadInit",
    "HeadMessage", "HeadNackSn", "HeadNewTx", "HeadRecover", "HeadReqSn", "HeadSync", "HeadSyncRequest",
]
